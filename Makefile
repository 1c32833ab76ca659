# make install | test | test-deps | serve | lint | proto | train-charlm | train-sentiment | export-models
#      cluster | cluster-down | compose-test | checkov
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIECES := training export server client
STAMP := $(VENV)/.installed

.PHONY: install test test-deps checkov serve lint proto train-charlm train-sentiment export-models cluster cluster-down compose-test clean

install: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt $(foreach p,$(PIECES),$(p)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -r requirements-dev.txt $(foreach p,$(PIECES),-e ./$(p))
	touch $@

test: install test-deps checkov
	$(BIN)/python -m pytest

# checkov, the Kubernetes manifests' policy linter, in its own venv (its pins conflict with the project's):
# deploy/kubernetes/checkov-requirements.txt. Without it tests/deploy/test_kubernetes.py skips its checkov test.
CHECKOV_VENV := $(VENV)/tools/checkov
checkov: $(CHECKOV_VENV)/.installed
$(CHECKOV_VENV)/.installed: deploy/kubernetes/checkov-requirements.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --no-deps -r deploy/kubernetes/checkov-requirements.txt
	touch $@

# redis-server and nginx for the Redis store's and the loopback cluster's tests (the fixtures never install them:
# without them those tests skip). Installed from Debian's packages when missing and apt-get is there (as root, or
# through sudo without a password); anywhere else this says what is missing and succeeds.
TEST_PACKAGES := redis-server nginx
test-deps:
	@missing=""; for binary in $(TEST_PACKAGES); do \
	  command -v $$binary >/dev/null 2>&1 || [ -x /usr/sbin/$$binary ] || [ -x /sbin/$$binary ] \
	    || missing="$$missing $$binary"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; \
	else echo "test-deps:$$missing missing (not root): their tests will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps:$$missing missing and no apt-get here: their tests will skip"; exit 0; fi; \
	echo "test-deps: installing$$missing from Debian's packages"; \
	{ $$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	  && $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	} >/dev/null || echo "test-deps: could not install$$missing: their tests will skip"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

serve: install
	$(BIN)/lstm-server --models models $(SERVE_ARGS)

# The compose topology as local processes on loopback (nginx and redis-server from Debian's packages, installed
# when missing): two replicas behind the session-aware gateway, sessions in Redis. State: .cluster/state.json.
CLUSTER_ARGS ?=
cluster: install
	$(BIN)/python deploy/cluster.py up $(CLUSTER_ARGS)

cluster-down:
	$(PYTHON) deploy/cluster.py down

# The real docker-compose.yml under Docker or podman (whichever runs here), on the official base images: build the
# images, bring the stack up, run the failover test through the gateway's published port, tear everything down.
# Says why and skips where neither can run. Settings, as make or environment variables (deploy/README.md):
# COMPOSE_TEST_ENGINE, COMPOSE_TEST_KEEP_IMAGES; opt-in for a machine without a registry or behind a proxy
# (CI's: .ci/run): COMPOSE_TEST_LOCAL_BASE=1, COMPOSE_TEST_CA=PATH, COMPOSE_TEST_PODMAN_DIR=DIR, COMPOSE_TEST_INSTALL=1.
compose-test: install
	bash deploy/compose-test.sh

# Triton's perf_analyzer (C++ load generator) in .perf-analyzer/bin/perf_analyzer: the PyPI wheel's binary, run on
# Debian trixie's libc where this system's is older than 2.38 (Debian 12); every download pinned by sha256.
# bench/perf_analyzer.py drives it against a server on loopback (docs/benchmarks.md).
.PHONY: perf-analyzer
perf-analyzer:
	bash bench/perf_analyzer_install.sh

# Regenerate the committed gRPC stubs after editing proto/ (a test checks they match).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=client/src --grpc_python_out=client/src \
	  --pyi_out=client/src proto/lstm/v1/lstm.proto

# The commands that trained the shipped checkpoints and exported the shipped entries (models/README.md).
# DATA points at the real data; the checkpoints land in runs/ and are copied to models/checkpoints/.
DATA ?= $(error set DATA to the folder that holds tinyshakespeare/input.txt and sst2/{train,dev}.tsv)
train-charlm: install
	$(BIN)/lstm-train charlm --data $(DATA)/tinyshakespeare/input.txt --out runs/charlm \
	  --num-layers 3 --hidden-size 448 --embedding-dim 64 --dropout 0.25 --batch-size 64 --seq-len 128 \
	  --lr 2e-3 --lr-decay 0.93 --warmup-steps 200 --epochs 60 --patience 4

train-sentiment: install
	$(BIN)/lstm-train sentiment --train $(DATA)/sst2/train.tsv --dev $(DATA)/sst2/dev.tsv --out runs/sentiment \
	  --embedding-dim 256 --hidden-size 256 --dropout 0.5 --batch-size 64 --lr 2e-3 --lr-decay 0.8 \
	  --epochs 12 --patience 4
	$(BIN)/lstm-train compact runs/sentiment/best.pt --out models/checkpoints/sentiment/best.pt

# The sentiment LSTM taught by a pretrained English model (issue 24, docs/training.md): the teacher extra, the
# fine-tuned teacher, its transfer data (logits on SST-2 train and augmented sentences), student seeds, then the
# best seed on dev compacted and exported as fp32 and int8 entries. Each stage writes under runs/ and is reused.
TEACHER_ARGS ?= --epochs 1 --max-len 64 --batch-size 32 --lr 5e-5 --eval-every 200
AUGMENT ?= 60000
SEEDS ?= 1 2 3
STUDENT_ARGS ?= --embedding-dim 384 --hidden-size 256 --dropout 0.3 --batch-size 64 --lr 2e-3 --lr-decay 0.8 \
  --epochs 8 --patience 3 --label-weight 0.5 --average-from 3 --threads 1
STUDENT_VERSION ?= 3
STUDENT_INT8_VERSION ?= 4
.PHONY: install-teacher train-teacher transfer-data train-student export-student
install-teacher: install
	$(BIN)/pip install --quiet -c constraints.txt -e './training[teacher]'

train-teacher: install-teacher
	$(BIN)/lstm-train teacher --train $(DATA)/sst2/train.tsv --dev $(DATA)/sst2/dev.tsv --out runs/teacher $(TEACHER_ARGS)

transfer-data: install-teacher
	$(BIN)/lstm-train transfer --teacher runs/teacher/best.pt --train $(DATA)/sst2/train.tsv --out runs/transfer.pt \
	  --augment $(AUGMENT)

train-student: install
	for seed in $(SEEDS); do \
	  $(BIN)/lstm-train sentiment --train $(DATA)/sst2/train.tsv --dev $(DATA)/sst2/dev.tsv --transfer runs/transfer.pt \
	    --out runs/student-$$seed --seed $$seed $(STUDENT_ARGS) || exit 1; \
	done
	$(BIN)/lstm-train summary $(foreach s,$(SEEDS),runs/student-$(s)/best.pt) \
	  --compact-best models/checkpoints/sentiment/student.pt

export-student: install
	$(BIN)/lstm-export models/checkpoints/sentiment/student.pt --out models/sentiment/$(STUDENT_VERSION) \
	  --eval-data $(DATA)/sst2/dev.tsv
	$(BIN)/lstm-export models/checkpoints/sentiment/student.pt --out models/sentiment/$(STUDENT_INT8_VERSION) \
	  --quantize --eval-data $(DATA)/sst2/dev.tsv

export-models: install
	$(BIN)/lstm-export models/checkpoints/charlm/best.pt --out models/charlm/1 --force \
	  --eval-data $(DATA)/tinyshakespeare/input.txt
	$(BIN)/lstm-export models/checkpoints/sentiment/best.pt --out models/sentiment/1 --force \
	  --eval-data $(DATA)/sst2/dev.tsv
	$(BIN)/lstm-export models/checkpoints/charlm/best.pt --out models/charlm/2 --force --quantize \
	  --eval-data $(DATA)/tinyshakespeare/input.txt
	$(BIN)/lstm-export models/checkpoints/sentiment/best.pt --out models/sentiment/2 --force --quantize \
	  --eval-data $(DATA)/sst2/dev.tsv

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
