"""``-p cpu_redirect``: a peer test that names CUDA devices runs on the CPU against pagoda's CPU path (a pytest
run in a subprocess: the plugin changes torch for its whole process)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "conformance"

PEER_STYLE_TEST = '''
import torch
import flashinfer


def test_cuda_named_tensors_run_on_the_cpu():
    assert torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0)
    g = torch.Generator("cuda:0").manual_seed(0)
    logits = torch.randn(4, 32, device="cuda:0", generator=g).to(0).cuda()
    assert logits.device.type == "cpu"
    probs = flashinfer.softmax(logits, temperature=0.5)
    torch.cuda.synchronize()
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, dim=-1))
    ids = flashinfer.sampling.top_k_sampling_from_probs(probs, 3, generator=g)
    assert ids.shape == (4,) and ids.device.type == "cpu"
'''


def test_peer_style_test_passes_with_cuda_read_as_cpu(tmp_path):
    (tmp_path / "test_peer.py").write_text(PEER_STYLE_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HARNESS / "shim"), str(HARNESS), str(ROOT),
                                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "cpu_redirect", "-p", "no:cacheprovider",
                        str(tmp_path / "test_peer.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout
