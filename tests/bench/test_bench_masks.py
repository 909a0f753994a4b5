"""The ``mask`` study on the CPU (tiny grid, reference path): report schema, ratios, and the half-empty mask's
tile geometry (exactly half of the masked kernel's tile pairs visited)."""
import json

import torch

from pagoda.bench import masks
from pagoda.cli import main
from pagoda.ops import _mask


def test_mask_study_cli_writes_every_variant_with_ratios(tmp_path, capsys):
    assert main(["bench", "mask", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mask.json").read_text())
    assert report["study"] == "mask" and set(report["backends"]) == set(masks.VARIANTS)
    rows = report["results"]
    assert len(rows) == len(masks.grid_cases("small")) * len(masks.VARIANTS)
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), [r["reason"] for r in rows]
    for r in rows:
        assert r["vs_unmasked_triton"] > 0 and r["vs_unmasked"] > 0
        assert (r["visited"] is None) == r["backend"].startswith("unmasked")
    assert "/ unmasked_triton" in capsys.readouterr().out


def test_half_tile_mask_leaves_half_the_kernel_tiles_empty():
    seqlen, group, d = 256, 2, 32
    m = masks.half_tile_mask(seqlen, group, d, True, torch.Generator().manual_seed(0))
    plan = _mask.plan_mask(m.reshape(-1), None, [seqlen], [seqlen], group, d, True, -1, "cpu")
    assert plan.visited == 0.5
    # and of the Gluon kernel's 128 x 128 tiles (seqlen 512: a 4 x 4 checkerboard)
    m = masks.half_tile_mask(512, group, d, False, torch.Generator().manual_seed(0))
    plan = _mask.plan_mask(m.reshape(-1), None, [512], [512], group, d, False, -1, "cpu", gluon=True)
    assert plan.visited == 0.5 and plan.gluon_tiles[1].tolist() == [0, 2, 4, 6, 8]
    assert 0.2 < m.float().mean() < 0.3       # half the blocks, half the bits in each
