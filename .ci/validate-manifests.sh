#!/usr/bin/env bash
# Validate deploy/ offline (no cluster on CI machines, so nothing is applied):
#   kubectl kustomize deploy/kubernetes -> kubernetes-validate --strict against the oldest
#   Kubernetes still supported upstream and the newest the validator ships schemas for.
# KServe's CRDs are not among those schemas: the validator only warns about them.
# tests/test_manifests.py validates their Pod parts and checks their KServe fields.
set -euo pipefail
cd "$(dirname "$0")/.."

OLDEST_SUPPORTED=1.35   # upstream end of life 2027-02-28 (1.34 ended 2026-10-27)
NEWEST=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
OUT=${CONVSERVE_CI_OUT:-out/ci}
mkdir -p "$OUT"

# kubectl: the machine's own if it has one; otherwise Debian's kubernetes-client (kubectl 1.20,
# whose built-in kustomize is old: if it cannot build the kustomization, say so and go on).
if ! command -v kubectl >/dev/null; then
  apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null 2>&1 \
    || echo "== kubectl: not installable here (Debian's kubernetes-client)"
fi
rendered=()
if command -v kubectl >/dev/null; then
  echo "== $(kubectl version --client 2>/dev/null | head -n 2 | paste -sd ' ')"
  if kubectl kustomize deploy/kubernetes >"$OUT/kubernetes.yaml"; then
    rendered=("$OUT/kubernetes.yaml")
    echo "== kubectl kustomize deploy/kubernetes: $(grep -c '^kind:' "$OUT/kubernetes.yaml") resources"
  else
    echo "== kubectl kustomize could not build deploy/kubernetes: only its files are validated"
  fi
else
  echo "== no kubectl: the kustomization is not built; only its files are validated"
fi

files=()
for f in deploy/kubernetes/*.yaml; do [ "$(basename "$f")" = kustomization.yaml ] || files+=("$f"); done
for version in "$OLDEST_SUPPORTED" "$NEWEST"; do
  python3 -m kubernetes_validate --strict --quiet -k "$version" "${rendered[@]}" "${files[@]}"
  echo "== kubernetes-validate --strict -k $version: deploy/kubernetes passed"
done
# KServe resources: the validator has no schema for their CRDs and says so (warning, exit 0).
python3 -m kubernetes_validate --strict -k "$NEWEST" deploy/kserve/*.yaml 2>&1 | sed 's/^/== kserve: /'
