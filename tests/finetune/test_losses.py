"""The outlier penalties of `outlierfree finetune` against float64 references, their gradients (gradcheck), and the
property each is chosen for."""

import pytest
import torch

from outlierfree.finetune.losses import outlier_penalty


def _sums(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 8, generator=g, dtype=torch.float64)  # (B, T, D) residual sums
    x[0, 4, 2] = 40.0  # one outlier in the first sequence
    return x


def _reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    rows = []
    for seq in x.reshape(x.shape[0], -1).tolist():  # plain Python over each sequence's values
        n = len(seq)
        mu = sum(seq) / n
        var = sum((v - mu) ** 2 for v in seq) / n
        peak = max(abs(v) for v in seq)
        rms = (sum(v * v for v in seq) / n) ** 0.5
        rows.append({"infnorm": peak, "crest": peak / rms,
                     "kurtosis": torch.log1p(torch.tensor(sum((v - mu) ** 4 for v in seq) / n / (var ** 2 + 1e-6),
                                                          dtype=torch.float64)).item()}[kind])
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["infnorm", "crest", "kurtosis"])
def test_penalty_matches_a_float64_reference_and_passes_gradcheck(kind):
    x = _sums()
    torch.testing.assert_close(outlier_penalty([x], kind), _reference(x, kind), rtol=1e-9, atol=1e-9)
    # two tensors: the mean of the two; tokens flattened as (B * T, D) regrouped per sequence by ``batch``
    y = _sums(1)
    both = outlier_penalty([x, y.reshape(-1, 8)], kind, batch=3)
    torch.testing.assert_close(both, (_reference(x, kind) + _reference(y, kind)) / 2, rtol=1e-9, atol=1e-9)
    z = _sums(2)[:, :4, :3].clone().requires_grad_(True)  # small: gradcheck perturbs every value
    z.data[0, 1, 1] = 9.0  # a unique maximum, where max |x| is differentiable
    assert torch.autograd.gradcheck(lambda t: outlier_penalty([t], kind), (z,))


def test_crest_is_scale_free_where_infnorm_rewards_shrinking_the_whole_tensor():
    """A residual sum scaled down as a whole (free for the LayerNorm after it) lowers infnorm but not crest or
    kurtosis; removing the outlier lowers all three."""
    x = _sums()
    calm = x.clone()
    calm[0, 4, 2] = 1.0
    for kind in ("crest", "kurtosis"):
        torch.testing.assert_close(outlier_penalty([0.25 * x], kind), outlier_penalty([x], kind), rtol=1e-3, atol=0)
    assert outlier_penalty([0.25 * x], "infnorm") < 0.3 * outlier_penalty([x], "infnorm")
    for kind in ("infnorm", "crest", "kurtosis"):
        assert outlier_penalty([calm[:1]], kind) < 0.5 * outlier_penalty([x[:1]], kind)  # the sequence it sat in


def _plain_ce(rows: list[list[float]], targets: list[int]) -> float:
    """Mean cross-entropy in plain Python (float64): log-sum-exp minus the target's logit, per row."""
    import math

    total = 0.0
    for logits, t in zip(rows, targets):
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[t]
    return total / len(rows)


def test_task_loss_matches_float64_references_transformers_and_gradcheck():
    """--task-weight's loss: a masked LM's masked positions, a language model's next tokens (padding out), an image
    classifier's labels, each against plain Python in float64, the masked LM's also against BertForMaskedLM's own
    loss; gradcheck on the logits; an encoder has no task loss."""
    from outlierfree.finetune.losses import task_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)  # (B, T, V)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 0  # three masked positions
    rows = [(b, t) for b in range(2) for t in range(5) if labels[b, t] != -100]
    ref = _plain_ce([logits[b, t].tolist() for b, t in rows], [int(labels[b, t]) for b, t in rows])
    torch.testing.assert_close(task_loss(logits, {"labels": labels}, "mlm"), torch.tensor(ref, dtype=torch.float64))

    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # padding: its tokens are neither predicted nor inputs of a prediction
    pairs = [(b, t) for b in range(2) for t in range(4) if mask[b, t + 1]]
    ref = _plain_ce([logits[b, t].tolist() for b, t in pairs], [int(ids[b, t + 1]) for b, t in pairs])
    torch.testing.assert_close(task_loss(logits, {"input_ids": ids, "attention_mask": mask}, "clm"),
                               torch.tensor(ref, dtype=torch.float64))

    img = torch.randn(4, 3, generator=g, dtype=torch.float64)  # (B, classes)
    y = torch.tensor([0, 2, 1, 2])
    ref = _plain_ce(img.tolist(), y.tolist())
    torch.testing.assert_close(task_loss(img, {"labels": y}, "image"), torch.tensor(ref, dtype=torch.float64))

    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: task_loss(x, {"labels": labels}, "mlm"), (z,))
    with pytest.raises(ValueError):
        task_loss(logits, {}, "encoder")

    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)).eval()
    inp = torch.randint(0, 50, (2, 6), generator=g)
    lab = torch.full((2, 6), -100)
    lab[0, 2], lab[1, 5] = 7, 9
    out = bert(input_ids=inp, labels=lab)
    torch.testing.assert_close(task_loss(out.logits, {"labels": lab}, "mlm"), out.loss)
