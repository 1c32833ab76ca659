#!/usr/bin/env bash
# Install Triton's perf_analyzer (the C++ load generator) into .perf-analyzer/ at the repository root, with no
# root, no container and no system change; `make perf-analyzer` runs this. Then:
#
#     .perf-analyzer/bin/perf_analyzer --version
#     .perf-analyzer/bin/perf_analyzer -i grpc -u 127.0.0.1:50051 -m sentiment ...
#
# perf_analyzer ships on PyPI as the wheel perf-analyzer 2.60.0 (one static-ish binary, perf_analyzer/bin/
# perf_analyzer, with a Python launcher), built for manylinux_2_38: it needs glibc 2.38 and libstdc++ with
# GLIBCXX_3.4.32 (GCC 13), and pip refuses it on Debian 12 (glibc 2.36, GCC 12). So this script
#
#   1. downloads the wheel (pinned URL and sha256; pip is not needed) and unpacks the binary;
#   2. if the binary does not start on this system's libraries, downloads Debian 13 (trixie)'s libc6,
#      libstdc++6 and libgcc-s1 (pinned URLs and sha256), unpacks them with dpkg-deb -x into
#      .perf-analyzer/sysroot/ (or with ar and tar where dpkg-deb is missing), and writes a launcher that runs
#      the binary through that folder's dynamic loader: ld-linux-x86-64.so.2 --library-path <sysroot libs>.
#      Only perf_analyzer runs on the newer libc; its other libraries (libssl3, zlib) come from the system,
#      found through the system's ld.so.cache, and nothing else on the machine is touched;
#   3. checks that `perf_analyzer --version` runs.
#
# Every download is checked against its sha256 below before it is used; a mismatch stops the install. Downloads
# are kept in .perf-analyzer/downloads/ so that a re-run is offline. The folder ignores itself (its own
# .gitignore). Environment: PERF_ANALYZER_HOME (default <repo>/.perf-analyzer), PERF_ANALYZER_SIDELOAD=1 to use
# the side-loaded libc even where the system's would do, PERF_ANALYZER_FORCE=1 to reinstall.
#
# When Debian moves trixie's libc6 on (a point release), deb.debian.org drops the pinned version from its pool
# and the snapshot.debian.org URL is the fallback. To move the pins: apt-cache show libc6 libstdc++6 libgcc-s1
# on a trixie system (or from a trixie Packages index) gives Filename and SHA256 for the lines below.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${PERF_ANALYZER_HOME:-$REPO/.perf-analyzer}
DOWNLOADS=$HOME_DIR/downloads

WHEEL_NAME=perf_analyzer-2.60.0-py3-none-manylinux_2_38_x86_64.whl
WHEEL_URL=https://files.pythonhosted.org/packages/f5/9c/01f1f189aa22f060d603a8de131836b834b0e5159a36bb7b44c980d60aeb/$WHEEL_NAME
WHEEL_SHA256=23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25

# Debian 13 (trixie), amd64: pool path and sha256 (the trixie Packages index: apt-cache show <package>).
DEBIAN_MIRROR=${PERF_ANALYZER_DEBIAN_MIRROR:-https://deb.debian.org/debian}
DEBIAN_SNAPSHOT=https://snapshot.debian.org/archive/debian/20261121T000000Z
DEBS=(
  "pool/main/g/glibc/libc6_2.41-12+deb13u4_amd64.deb 967aa62605721081c3eb2a17650611a792aa802d76a6511d1840242623d204c9"
  "pool/main/g/gcc-14/libstdc++6_14.2.0-19_amd64.deb ab1fa05837aa7a92aae748fd07a18a35f7d18bb4a71c4724fe2bbf0e32089de0"
  "pool/main/g/gcc-14/libgcc-s1_14.2.0-19_amd64.deb 3c71917b490d1a17aed43196a2787a256ecf060526cdb20216a74bedc061b150"
)

say() { echo "perf-analyzer: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(uname -m)" = x86_64 ] || die "this installs the x86_64 build only (this machine: $(uname -m))"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch FILE SHA256 URL...: FILE verified against SHA256, downloaded from the first URL that gives the right bytes.
fetch() {
  local file=$1 want=$2 url
  shift 2
  if [ -f "$file" ] && [ "$(sha256_of "$file")" = "$want" ]; then
    return 0
  fi
  for url in "$@"; do
    say "downloading $url"
    rm -f "$file.part"
    if command -v curl >/dev/null 2>&1; then
      curl -fsSL --retry 3 --connect-timeout 20 -o "$file.part" "$url" || { say "  failed"; continue; }
    else
      python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$url" "$file.part" || { say "  failed"; continue; }
    fi
    local got
    got=$(sha256_of "$file.part")
    if [ "$got" = "$want" ]; then
      mv "$file.part" "$file"
      return 0
    fi
    say "  sha256 mismatch: expected $want, got $got (discarded)"
    rm -f "$file.part"
  done
  die "could not download a verified $(basename "$file")"
}

# unpack_deb DEB DIR: the package's files under DIR (dpkg-deb, or ar + tar where dpkg is missing).
unpack_deb() {
  if command -v dpkg-deb >/dev/null 2>&1; then
    dpkg-deb -x "$1" "$2"
  else
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && ar x "$1") || die "neither dpkg-deb nor ar is here to unpack $(basename "$1")"
    tar -xf "$tmp"/data.tar.* -C "$2"
    rm -rf "$tmp"
  fi
}

BIN=$HOME_DIR/bin/perf_analyzer
if [ -x "$BIN" ] && [ -z "${PERF_ANALYZER_FORCE:-}" ] && "$BIN" --version >/dev/null 2>&1; then
  say "already installed: $BIN ($("$BIN" --version 2>&1 | head -1))"
  exit 0
fi

mkdir -p "$DOWNLOADS" "$HOME_DIR/bin"
[ -f "$HOME_DIR/.gitignore" ] || echo '*' >"$HOME_DIR/.gitignore"

# 1. the wheel: a zip; only the binary is used (the wheel's launcher is a Python subprocess wrapper).
fetch "$DOWNLOADS/$WHEEL_NAME" "$WHEEL_SHA256" "$WHEEL_URL"
rm -rf "$HOME_DIR/wheel"
python3 -m zipfile -e "$DOWNLOADS/$WHEEL_NAME" "$HOME_DIR/wheel"
REAL=$HOME_DIR/wheel/perf_analyzer/bin/perf_analyzer
chmod +x "$REAL"

# 2. the system's libraries, or trixie's beside them.
if [ -z "${PERF_ANALYZER_SIDELOAD:-}" ] && "$REAL" --version >/dev/null 2>&1; then
  say "the system's libc runs it ($(ldd --version 2>&1 | head -1)): no side-loaded libc"
  cat >"$BIN" <<EOF
#!/bin/sh
exec "$REAL" "\$@"
EOF
else
  say "the system's libc does not run it ($(ldd --version 2>&1 | head -1)): side-loading Debian trixie's libc6"
  SYSROOT=$HOME_DIR/sysroot
  rm -rf "$SYSROOT"
  mkdir -p "$SYSROOT"
  for entry in "${DEBS[@]}"; do
    read -r path sha <<<"$entry"
    deb=$DOWNLOADS/$(basename "$path")
    fetch "$deb" "$sha" "$DEBIAN_MIRROR/$path" "$DEBIAN_SNAPSHOT/$path"
    unpack_deb "$deb" "$SYSROOT"
  done
  LIBS=$SYSROOT/usr/lib/x86_64-linux-gnu
  [ -x "$LIBS/ld-linux-x86-64.so.2" ] || die "no dynamic loader in $LIBS"
  for lib in libssl.so.3 libcrypto.so.3 libz.so.1; do
    ldconfig -p 2>/dev/null | grep -q "$lib " || [ -e "/lib/x86_64-linux-gnu/$lib" ] \
      || die "$lib is missing from this system: apt-get install libssl3 zlib1g (Debian 12) and run this again"
  done
  # argv[0] stays the loader's; perf_analyzer never re-executes itself, so nothing needs /proc/self/exe.
  cat >"$BIN" <<EOF
#!/bin/sh
# perf_analyzer 2.60.0 on Debian trixie's glibc 2.41 (bench/perf_analyzer_install.sh); the system's libc is untouched.
exec "$LIBS/ld-linux-x86-64.so.2" --library-path "$LIBS" "$REAL" "\$@"
EOF
fi
chmod +x "$BIN"

# 3. it runs.
version=$("$BIN" --version 2>&1) || die "installed, but '$BIN --version' fails: $version"
say "installed: $BIN ($version)"
