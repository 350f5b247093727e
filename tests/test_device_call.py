"""benchmarks/device_call.sh and gpu_run.sh, dry-run on CPU: every command the leased-GPU call (or a user's own GPU
run) would run is well-formed (a typo there costs a whole 15-minute lease). python3 is a stub that records its
arguments; each `seqpe-kernels` command line must parse, each pytest target and benchmark script must exist."""
import os
import shlex
import stat
import subprocess
import sys

import pytest

from seqpe_kernels.cli import build_parser

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' "$@")" >> "$CALLS"
if [[ "$1" == -c ]]; then echo Test_GPU; fi
exit 0
"""


def _dry_run(tmp_path, script_args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls))
    argv = [a if a != "OUT" else str(out) for a in script_args]
    r = subprocess.run(["bash"] + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return [shlex.split(line) for line in calls.read_text().splitlines()], out, r.stdout


def _check_commands(calls, what):
    """(seqpe-kernels argvs, pytest argvs, scripts) of the recorded calls, after checking each is well-formed."""
    cli, scripts, pytests = [], [], []
    for argv in calls:
        args = [a for a in argv if a not in ("-X", "faulthandler")]
        if args[:2] == ["-m", "seqpe_kernels.cli"]:
            cli.append(args[2:])
        elif args[:2] == ["-m", "pytest"]:
            pytests.append(args[2:])
        elif args and args[0].endswith(".py"):
            scripts.append(args[0])
    parser = build_parser()
    for a in cli:
        try:
            parser.parse_args(a)
        except SystemExit as e:
            pytest.fail(f"{what}: `seqpe-kernels {' '.join(a)}` does not parse (exit {e.code})")
    for a in pytests:
        targets = [x for x in a if x.startswith("tests")]
        assert targets, a
        for t in targets:
            assert os.path.exists(os.path.join(ROOT, t.split("::")[0])), f"{what}: pytest target {t} does not exist"
    for s in scripts:
        assert os.path.exists(os.path.join(ROOT, s)), f"{what}: script {s} does not exist"
    _check_script_args([a for a in calls if a and a[0].endswith(".py")], what)
    return cli, pytests, scripts


PARSE_ONLY = """
import argparse, runpy, sys
class Parsed(Exception):
    pass
def parse_args(self, args=None, namespace=None):
    argparse.ArgumentParser.parse_known_args = real  # (parse_args calls it)
    try:
        ns, extra = real(self, args, namespace)
    finally:
        argparse.ArgumentParser.parse_known_args = guard
    if extra:
        self.error("unrecognized arguments: " + " ".join(extra))
    raise Parsed
real = argparse.ArgumentParser.parse_known_args
def guard(self, *a, **k):
    raise Parsed  # a script parsing with parse_known_args: its arguments are not checked here
argparse.ArgumentParser.parse_args = parse_args
argparse.ArgumentParser.parse_known_args = guard
for argv in {argvs!r}:
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except Parsed:
        continue
    except SystemExit as e:
        sys.exit(f"`python {{' '.join(argv)}}` does not parse (exit {{e.code}})")
    sys.exit(f"`python {{' '.join(argv)}}` ran past its argument parsing")
"""


def _check_script_args(argvs, what):
    """Each benchmark script's recorded arguments parse: the script runs as __main__ up to its parse_args, which
    stops it (one process for all: the scripts import torch)."""
    if not argvs:
        return
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", PARSE_ONLY.format(argvs=[list(a) for a in argvs])], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{what}: {r.stderr[-2000:]}"


@pytest.mark.parametrize("phase", ["f1", "f2", "g"])
def test_each_phase_of_the_device_call_is_well_formed(tmp_path, phase):
    calls, out, stdout = _dry_run(tmp_path, ["benchmarks/device_call.sh", phase, "OUT", "560"])
    assert (out / "logs.tgz").exists(), "the logs must come back bundled"
    assert "skipped, out of time" not in stdout  # with instant commands every step runs
    assert len(list(out.iterdir())) <= 8, "the device tool brings back at most 8 files"
    _check_commands(calls, f"device_call.sh {phase}")


@pytest.mark.parametrize("phase", ["f"])
def test_every_command_of_the_device_call_is_well_formed(tmp_path, phase):
    calls, out, stdout = _dry_run(tmp_path, ["benchmarks/device_call.sh", phase, "OUT", "1200"])
    assert (out / "logs.tgz").exists(), "the logs must come back bundled"
    assert "skipped, out of time" not in stdout  # with instant commands every step runs
    cli, pytests, scripts = _check_commands(calls, f"device_call.sh {phase}")
    # what phase f must at least run: parity checks, the GPU tier, both paper configs, the TF32 row, the tables
    joined = [" ".join(a) for a in cli]
    for want in ("check --backend triton", "check --backend cuda", "--config text-default", "--config vits-default ",
                 "--config vits-default-tf32"):
        assert any(want in j + " " for j in joined), f"phase {phase} no longer runs `{want}`"
    assert any("-m gpu" in " ".join(a) for a in pytests)
    assert "benchmarks/readme_table.py" in scripts


def test_every_command_of_gpu_run_is_well_formed(tmp_path):
    """benchmarks/gpu_run.sh, the README's way to reproduce the GPU figures on one's own GPU."""
    calls, out, _ = _dry_run(tmp_path, ["benchmarks/gpu_run.sh", "OUT"])
    cli, pytests, scripts = _check_commands(calls, "gpu_run.sh")
    assert [a[0] for a in cli] == ["env", "check", "bench"]
    assert any("-m gpu" in " ".join(a) for a in pytests), "the GPU tier"
    assert scripts == ["benchmarks/ext_error_path.py", "benchmarks/readme_table.py"]


def test_profile_step_host_breakdown_runs_on_cpu():
    """profile_step.py --host-rows (the device call's view of where each provider's host time goes) on the C++ CPU
    backend: the forward / backward host times and the per-step cProfile rows, the extension's call among them."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from profile_step import host_breakdown
    finally:
        sys.path.pop(0)
    import seqpe_kernels as sk
    from seqpe_kernels.backend import available_backends

    torch.manual_seed(0)
    ref = sk.SeqPE(embed_dim=16, num_heads=2, max_digits=3).train()
    backend = "cpu" if available_backends(torch.device("cpu"))["cpu"][0] else "torch"
    mod = ref if backend == "torch" else sk.FusedSeqPE.from_reference(ref, backend=backend)
    text = host_breakdown(mod, torch.arange(8), None, steps=3, rows=6)
    lines = text.splitlines()
    assert lines[0].startswith("--- host: forward call ") and "backward call" in lines[0]
    assert "device threads off: " in lines[0] and "ms" in lines[0].split("device threads off: ")[1]
    assert "no Python encoder backward" in lines[0]  # eager and the C++ backend have no Python autograd node
    assert len(lines) == 3 + 6
    assert any("run_backward" in line for line in lines[3:])
    for line in lines[3:]:
        own, cum, calls = line.split()[:3]
        assert 0 <= float(own) <= float(cum) + 0.05 and float(calls) >= 0


def test_backward_watch_sees_the_autograd_thread():
    """On CUDA autograd runs the Triton encoder's Python backward on its device thread, which the main thread's
    cProfile misses: the breakdown's watch must time and profile it there. A Python thread stands in for the
    engine's (on CPU the engine runs backward on the calling thread); the Triton encoder runs interpreted."""
    import threading

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from profile_step import _BackwardWatch, host_breakdown
    finally:
        sys.path.pop(0)
    import seqpe_kernels as sk
    from seqpe_kernels.backend import available_backends
    from seqpe_kernels.encoder import EncoderFunction

    if not available_backends(torch.device("cpu"))["triton"][0]:
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 on CPU (conftest sets it unless overridden)")
    torch.manual_seed(0)
    ref = sk.SeqPE(embed_dim=16, num_heads=2, max_digits=2, num_layers=1).train()
    mod = sk.FusedSeqPE.from_reference(ref, backend="triton")
    orig = EncoderFunction.__dict__["backward"]
    with _BackwardWatch() as w:
        w.profile = True
        y = mod(torch.arange(4))
        t = threading.Thread(target=y.backward, args=(torch.ones_like(y),))
        t.start()
        t.join()
        y = mod(torch.arange(4))
        y.backward(torch.ones_like(y))
    assert EncoderFunction.__dict__["backward"] is orig  # uninstalled
    assert w.threads == {"autograd worker", "main"} and len(w.times) == 2 and min(w.times) > 0
    assert len(w.profs) == 1  # the worker's call, profiled on its own thread (the main thread's: by the caller)
    import pstats

    seen = pstats.Stats(w.profs[0]).stats
    assert any(f.endswith(os.path.join("seqpe_kernels", "encoder.py")) and n == "backward" for (f, _, n) in seen)
    assert all(p.grad is not None for p in mod.parameters() if p.requires_grad)
    text = host_breakdown(mod, torch.arange(4), None, steps=1, rows=4)
    assert "the Python backward ran on the main thread" in text.splitlines()[0]
