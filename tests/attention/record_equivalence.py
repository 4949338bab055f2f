"""Records what every attention variant computes, to prove a refactoring changes nothing (issue 25).

Not a test module. Run it at the commit before a change and after it, then compare bit for bit:

    PYTHONPATH=src python3 tests/attention/record_equivalence.py record /tmp/before.pt --checkpoints /tmp/ckpts
    (change the code)
    PYTHONPATH=src python3 tests/attention/record_equivalence.py record /tmp/after.pt
    PYTHONPATH=src python3 tests/attention/record_equivalence.py compare /tmp/before.pt /tmp/after.pt \
        --checkpoints /tmp/ckpts

For every config below x family (bert / opt / vit tiny, seed 0) x kernel (every ``impl`` the variant accepts) it
stores the logits and loss in eval mode, the loss and every parameter gradient in train mode (dropout seeded), the
attention probabilities (``output_attentions``), the loss with the gamma ramp at 0.5 (clipped / NCS), and the
``describe()`` / ``dead_at_init`` answers. ``--checkpoints DIR`` (at record time) also saves one model per
config with the code of that commit and its outputs; ``compare --checkpoints DIR`` loads them with the current code
and checks that they compute the same (``torch.equal``). It only uses the Python API that must keep working
(``AttentionConfig(variant, **fields)``, ``build_model``, ``save_model``, ``load_model``, ``set_gamma_ramp``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

CONFIGS: dict[str, dict] = {
    "vanilla": {"variant": "vanilla"},
    "clipped_gamma": {"variant": "clipped", "gamma": -0.01, "zeta": 1.0},
    "clipped_gamma_zeta": {"variant": "clipped", "gamma": -0.03, "zeta": 1.1},
    "clipped_paper": {"variant": "clipped", "gamma": -0.025, "zeta": 1.0},
    "clipped_alpha_fixed": {"variant": "clipped", "alpha": 2.0},
    "clipped_alpha_fixed_len": {"variant": "clipped", "alpha": 3.0, "alpha_t": "fixed", "max_len": 20},
    "clipped_alpha_row": {"variant": "clipped", "alpha": 1.0, "alpha_t": "row"},
    "clipped_alpha_row_big": {"variant": "clipped", "alpha": 12, "alpha_t": "row"},
    "gated": {"variant": "gated"},
    "gated_linear_ft": {"variant": "gated", "gate_type": "linear", "gate_finetune": True},
    "gated_mlp_head": {"variant": "gated", "gate_type": "mlp", "gate_per": "head", "gate_init": 0.4},
    "gated_elementwise": {"variant": "gated", "gate_type": "elementwise"},
    "gated_scalar": {"variant": "gated", "gate_type": "scalar", "gate_per": "head"},
    "gated_linear_head": {"variant": "gated", "gate_type": "linear", "gate_per": "head"},
    "ncs": {"variant": "ncs"},
    "ncs_strong": {"variant": "ncs", "eta": 1.2, "beta": 0.8},
    "softmax1": {"variant": "softmax1"},
    "sink": {"variant": "sink"},
    "sink_init": {"variant": "sink", "sink_init": -0.5},
    "softpick": {"variant": "softpick"},
    "softpick_eps": {"variant": "softpick", "softpick_eps": 1e-3},
    "sigmoid": {"variant": "sigmoid"},
    "softplus": {"variant": "softplus"},
    "softplus_none_pow": {"variant": "softplus", "softplus_scale": "none", "softplus_power": 2.0},
}
IMPLS = ("auto", "eager", "sdpa", "blocked")
FAMILIES = ("bert", "opt", "vit")


def _batch(family: str, model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        c = model.config
        return dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g),
                    labels=torch.tensor([1, 3]))
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _config(fields: dict, impl: str):
    from outlierfree import AttentionConfig

    kw = {k: v for k, v in fields.items() if k != "variant"}
    return AttentionConfig(fields["variant"], impl=impl, **kw)


def _model(family: str, cfg):
    from outlierfree import build_model

    model = build_model(family, "tiny", cfg, seed=0)
    with torch.no_grad():  # trained-looking extra parameters (sinks start equal; gates at their init)
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "outlierfree_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _run(model, family: str) -> dict:
    from outlierfree.attention import set_gamma_ramp

    b = _batch(family, model)
    out: dict = {}
    model.eval()
    with torch.no_grad():
        o = model(**b)
        out["eval_logits"], out["eval_loss"] = o.logits, o.loss
        oa = model(**b, output_attentions=True)
        out["probs"] = torch.stack([a for a in oa.attentions])
        out["probs_logits"] = oa.logits
    model.train()
    torch.manual_seed(7)
    o = model(**b)
    o.loss.backward()
    out["train_loss"] = o.loss.detach()
    for n, p in model.named_parameters():
        if p.grad is not None:
            out["grad/" + n] = p.grad.clone()
    model.zero_grad(set_to_none=True)
    model.eval()
    set_gamma_ramp(model, 0.5)
    with torch.no_grad():
        out["ramp_logits"] = model(**b).logits
    set_gamma_ramp(model, 1.0)
    return out


def record(path: str, ckpt_dir: str | None) -> None:
    from outlierfree import save_model
    from outlierfree.errors import OutlierfreeError

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rec: dict = {}
    for name, fields in CONFIGS.items():
        for impl in IMPLS:
            try:
                cfg = _config(fields, impl)
            except OutlierfreeError:
                rec[f"{name}/{impl}/refused"] = True
                continue
            rec[f"{name}/{impl}/describe"] = cfg.describe()
            rec[f"{name}/{impl}/dead"] = [cfg.dead_at_init(T) for T in (1, 2, 17, 64, 128, 512)]
            for family in FAMILIES:
                model = _model(family, cfg)
                for k, v in _run(model, family).items():
                    rec[f"{name}/{impl}/{family}/{k}"] = v
                if ckpt_dir is not None and impl == "auto":
                    d = Path(ckpt_dir) / f"{name}-{family}"
                    model.eval()
                    save_model(model, d)
                    with torch.no_grad():
                        torch.save(model(**_batch(family, model)).logits, d / "reference_logits.pt")
        print(name, flush=True)
    torch.save(rec, path)
    print(f"{len(rec)} entries -> {path}")


def compare(a_path: str, b_path: str, ckpt_dir: str | None) -> int:
    from outlierfree import load_model

    torch.set_num_threads(1)
    a, b = torch.load(a_path), torch.load(b_path)
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            bad.append(k)
    print(f"{len(set(a) & set(b))} common entries, {len(bad)} differ or are missing")
    for k in bad[:40]:
        print("  DIFF", k, a.get(k) if not isinstance(a.get(k), torch.Tensor) else "",
              b.get(k) if not isinstance(b.get(k), torch.Tensor) else "")
    n_ck = 0
    if ckpt_dir is not None:
        for d in sorted(Path(ckpt_dir).iterdir()):
            family = d.name.rsplit("-", 1)[1]
            model = load_model(d)
            with torch.no_grad():
                logits = model(**_batch(family, model)).logits
            n_ck += 1
            if not torch.equal(logits, torch.load(d / "reference_logits.pt")):
                bad.append(f"checkpoint {d.name}")
                print("  DIFF checkpoint", d.name)
        print(f"{n_ck} old checkpoints loaded and compared")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--checkpoints", default=None)
    a = ap.parse_args()
    if a.mode == "record":
        record(a.paths[0], a.checkpoints)
        return 0
    return compare(a.paths[0], a.paths[1], a.checkpoints)


if __name__ == "__main__":
    sys.exit(main())
