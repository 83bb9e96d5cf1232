# Deployment checks that need no Docker engine and no cluster; `include mk/deploy.mk` from the
# root Makefile, or run `make -f mk/deploy.mk chart compose-check`. `bash deploy/tools.sh`
# installs ./tools/helm and ./tools/docker-compose first (the `deploy-tools` target does it).
#
#   chart          helm lint --strict; render deploy/k8s/rendered/{default,production}.yaml;
#                  validate every manifest against the Kubernetes $(K8S_VERSION) schemas
#   compose-check  docker-compose.yml through the real Compose binary, with and without the
#                  observability profile

# Keep the including Makefile's default goal.
_DEPLOY_MK_PREVIOUS_GOAL := $(.DEFAULT_GOAL)

HELM ?= ./tools/helm
COMPOSE ?= ./tools/docker-compose
UV ?= uv
# The Kubernetes version the chart is rendered for and validated against.
K8S_VERSION ?= 1.33.0
CHART_DIR := deploy/k8s/postback
RENDERED_DIR := deploy/k8s/rendered
CHART_RELEASE := postback
CHART_NAMESPACE := postback
# Custom resources the Kubernetes schemas do not know: skipped by name, never silently.
CRD_KINDS := KafkaTopic ScaledObject ServiceMonitor

# The chart needs a master key (secrets.existingSecret or secrets.secretKey): the default render
# names the secret the deployment guide has the operator create.
DEFAULT_SECRET := postback-secrets
DEFAULT_VALUES = --set secrets.existingSecret=$(DEFAULT_SECRET)
HELM_TEMPLATE = $(HELM) template $(CHART_RELEASE) $(CHART_DIR) \
	--namespace $(CHART_NAMESPACE) --kube-version $(K8S_VERSION)

.PHONY: deploy-tools chart chart-lint chart-render chart-validate compose-check

deploy-tools:  ## Install ./tools/helm and ./tools/docker-compose (no Docker engine needed)
	bash deploy/tools.sh

$(HELM) $(COMPOSE):
	@test -x $@ || { echo "$@ is missing: run 'bash deploy/tools.sh' (or make deploy-tools)" >&2; exit 1; }

chart: chart-lint chart-render chart-validate  ## Lint the Helm chart, render deploy/k8s/rendered/, validate it

chart-lint: | $(HELM)
	$(HELM) lint --strict $(CHART_DIR) $(DEFAULT_VALUES)
	$(HELM) lint --strict $(CHART_DIR) -f deploy/k8s/values-production.yaml

chart-render: | $(HELM)
	@mkdir -p $(RENDERED_DIR)
	$(HELM_TEMPLATE) $(DEFAULT_VALUES) > $(RENDERED_DIR)/default.yaml.tmp
	mv $(RENDERED_DIR)/default.yaml.tmp $(RENDERED_DIR)/default.yaml
	$(HELM_TEMPLATE) -f deploy/k8s/values-production.yaml > $(RENDERED_DIR)/production.yaml.tmp
	mv $(RENDERED_DIR)/production.yaml.tmp $(RENDERED_DIR)/production.yaml

chart-validate: chart-render
	K8S_VERSION=$(K8S_VERSION) CRD_KINDS="$(CRD_KINDS)" \
		$(UV) run python -c "$$DEPLOY_VALIDATE_PY" $(RENDERED_DIR)/default.yaml $(RENDERED_DIR)/production.yaml

# The file requires a master key; any will do to check it.
COMPOSE_CHECK = POSTBACK_SECRET_KEY=compose-config-check-not-a-real-key $(COMPOSE) -f docker-compose.yml

compose-check: | $(COMPOSE)  ## Check docker-compose.yml with the real Compose binary
	$(COMPOSE_CHECK) config --quiet
	$(COMPOSE_CHECK) --profile observability config --quiet
	@echo "docker-compose.yml: valid ($$($(COMPOSE) version --short)), with and without --profile observability"

# Strict validation (unknown fields are errors) of every document with kubernetes-validate;
# the kinds in CRD_KINDS are reported as skipped, any other unknown kind fails.
define DEPLOY_VALIDATE_PY
import os, sys
import yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

version = os.environ["K8S_VERSION"]
crd_kinds = set(os.environ["CRD_KINDS"].split())
failures = 0
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    counts, skipped = {}, {}
    for doc in docs:
        kind, name = doc.get("kind", "?"), doc.get("metadata", {}).get("name", "?")
        if kind in crd_kinds:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            counts[kind] = counts.get(kind, 0) + 1
        except ValidationError as e:
            failures += 1
            where = ".".join(str(p) for p in e.path)
            print(f"ERROR {path}: {kind}/{name}: {where}: {e.message}")
        except SchemaNotFoundError as e:
            failures += 1
            print(f"ERROR {path}: {kind}/{name}: {e.message} (add it to CRD_KINDS if it is a CRD)")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{path}: {sum(counts.values())} manifests valid against Kubernetes {version} (strict): {summary}")
    for kind, n in sorted(skipped.items()):
        print(f"{path}: skipped {n} {kind} (custom resource, no schema in kubernetes-validate)")
sys.exit(1 if failures else 0)
endef
export DEPLOY_VALIDATE_PY

.DEFAULT_GOAL := $(_DEPLOY_MK_PREVIOUS_GOAL)
