"""scripts/pack_checkpoint.py: a format-2 checkpoint packed to half precision loads, keeps
its config and stays close to the original; a bad source is a clear error."""

import runpy
import sys

import torch

from m2core.checkpoint import load_checkpoint, save_checkpoint
from m2core.model_v2 import M2ConfigV2, M2ModelV2

TINY = {"dim": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "image_levels": (4, 4, 4),
        "text_vocab": 300, "caption_len": 12, "action_classes": 5, "input_tokens": 64,
        "target_tokens": 64}  # fmt: skip


def _pack(*args: str) -> int:
    argv, sys.argv = sys.argv, ["pack_checkpoint.py", *args]
    try:
        runpy.run_path("scripts/pack_checkpoint.py", run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
    return 0


def test_pack_a_format_2_checkpoint_to_half_precision(tmp_path, capsys):
    torch.manual_seed(0)
    model = M2ModelV2(M2ConfigV2(**TINY)).eval()
    save_checkpoint(tmp_path / "src", model)
    assert _pack(str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "float16") == 0
    out = capsys.readouterr().out
    assert "packed" in out and "max diff" in out
    diff = float(out.split("max diff ")[1].split()[0].rstrip(","))
    assert 0 < diff < 0.05  # fp16 rounding: not zero, not large
    loaded = load_checkpoint(tmp_path / "dst").model
    assert type(loaded) is M2ModelV2 and loaded.config == model.config
    src_size = sum(p.stat().st_size for p in (tmp_path / "src").rglob("*.safetensors"))
    dst_size = sum(p.stat().st_size for p in (tmp_path / "dst").rglob("*.safetensors"))
    assert dst_size < 0.6 * src_size


def test_pack_refuses_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert _pack(str(tmp_path / "src"), str(tmp_path / "dst")) == 2
    assert "pack_checkpoint: error:" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
