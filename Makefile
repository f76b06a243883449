# comfyfarm developer targets. `make test` is what CI runs (see .ci/run).

GO          ?= go
PKGS        ?= ./...
BIN         ?= bin/comfyfarm
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS     := -s -w -X main.version=$(VERSION)
FUZZTIME    ?= 30s
IMAGE       ?= comfyfarm:$(VERSION)

.PHONY: all build test test-short vet lint fmt fmt-check ci run demo sim bench fuzz soak docker clean

all: fmt-check vet lint test

## build: a static binary in bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/comfyfarm

## test: every test, with the race detector (MySQL cases run when MariaDB answers)
test:
	$(GO) test -race -count=1 -timeout 30m $(PKGS)

## test-short: the tests without the race detector, faster
test-short:
	$(GO) test -count=1 $(PKGS)

## soak: the chaos soak (about a minute per run): 3 fake node processes killed -9
## and restarted, `comfyfarm serve` killed -9 and restarted, on SQLite (SOAK_MYSQL=1:
## MariaDB, taken away once behind a fault proxy); SOAK_RUNS runs in a row, SOAK_JOBS each
SOAK_RUNS ?= 1
SOAK_JOBS ?= 500
SOAK_MYSQL ?=
soak:
	COMFYFARM_SOAK_JOBS=$(SOAK_JOBS) COMFYFARM_SOAK_MYSQL=$(SOAK_MYSQL) \
		$(GO) test -tags soak -run '^TestSoak$$' -count=$(SOAK_RUNS) -failfast -timeout 0 -v ./cmd/comfyfarm/

vet:
	$(GO) vet $(PKGS)

## lint: staticcheck (go install honnef.co/go/tools/cmd/staticcheck@v0.8.2)
lint:
	staticcheck $(PKGS)

fmt:
	gofmt -w .

fmt-check:
	@test -z "$$(gofmt -l .)" || { echo "not gofmt-formatted:"; gofmt -l .; exit 1; }

## ci: what CI runs: MariaDB up, gofmt, vet, staticcheck, tests with MySQL required
ci:
	./.ci/run

## run: the server with the built-in defaults (SQLite and files under ./data)
run:
	$(GO) run ./cmd/comfyfarm serve

## demo: the whole farm on this machine, fake GPU nodes included
demo:
	$(GO) run ./cmd/comfyfarm demo

## sim: a fake ComfyUI node on 127.0.0.1:8188
sim:
	$(GO) run ./cmd/comfyfarm sim --port 8188

## bench: every benchmark, reported (not asserted)
bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

## fuzz: each fuzz target for FUZZTIME
fuzz:
	@for pkg in $$($(GO) list $(PKGS)); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

docker:
	docker build -f docker/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE) .

clean:
	rm -rf bin
