"""Throughput settings change speed, not results: response-only logits, bf16 autocast, LoRA layer range,
length buckets — each checked against the original computation on a tiny random model (no raw data)."""

import tiny_models
import torch

from emoverse.model import EmoVerse, ModelConfig
from emoverse.tasks import TASKS
from emoverse.train.trainer import TrainConfig, Trainer

TINY = dict(tiny_models.TINY, lora_dropout=0.0)


def _model(**over) -> EmoVerse:
    torch.manual_seed(0)
    m = EmoVerse.build(ModelConfig(**{**TINY, **over}))
    m.freeze_base()
    with torch.no_grad():  # LoRA B starts at zero; give it weight so the adapters matter in the comparison
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return m


def _batch(m: EmoVerse) -> dict:
    msa, mer = TASKS["msa"], TASKS["mer"]
    items = [
        m.prompts.encode(msa.query("what a lovely day"), "Positive.", [], []),
        m.prompts.encode(mer.query("I hate this, I really do, go away"), "Anger.", [], []),
        m.prompts.encode(msa.query("no"), "Negative.", [], []),
    ]
    return m.prompts.collate(items)


def test_response_loss_equals_full_logits_loss():
    m = _model()
    batch = _batch(m)
    full = m(batch).loss
    fast = m(batch, response_loss_only=True)
    assert torch.allclose(full, fast, rtol=1e-5, atol=1e-6)
    g_full = torch.autograd.grad(full, list(m.trainable_parameters().values()), allow_unused=True)
    g_fast = torch.autograd.grad(
        m(batch, response_loss_only=True), list(m.trainable_parameters().values()), allow_unused=True
    )
    for a, b in zip(g_full, g_fast, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_loss_within_tolerance_of_fp32():
    m = _model()
    batch = _batch(m)
    fp32 = m(batch, response_loss_only=True).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = m(batch, response_loss_only=True)
    assert bf16.dtype == torch.float32  # the loss itself is computed in fp32
    assert abs(bf16.item() - fp32) / fp32 < 0.02
    # master weights stay fp32
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters().values())


def test_bf16_training_follows_fp32_over_steps():
    """A few dozen optimiser steps on the same batches: bf16 autocast tracks the fp32 loss curve."""
    curves = {}
    for precision in ("fp32", "bf16"):
        m = _model()
        m.llm.requires_grad_(True)  # the whole tiny LLM trains, so the loss moves far within a few steps
        batch = _batch(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        curve = []
        for _ in range(40):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with ctx:
                loss = m(batch, response_loss_only=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[precision] = curve
    assert curves["fp32"][-1] < 0.6 * curves["fp32"][0]  # it learns
    for a, b in zip(curves["fp32"], curves["bf16"], strict=True):
        assert abs(a - b) <= 0.05 * a + 0.05


def test_lora_from_layer_puts_adapters_only_on_upper_layers():
    m = _model(
        tiny={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        lora_from_layer=2,
    )
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in m.trainable_parameters() if "lora_" in n}
    assert layers == {2, 3}
    # a text batch's backward stops above the frozen layers: nothing below layer 2 holds a gradient path
    m(_batch(m), response_loss_only=True).backward()
    assert all(p.grad is not None for n, p in m.trainable_parameters().items() if "lora_" in n)


def test_lora_from_layer_out_of_range_is_refused():
    import pytest

    with pytest.raises(ValueError, match="lora_from_layer"):
        _model(lora_from_layer=5)


class _Pool(Trainer):
    """Trainer with a hand-made pool (no model, no data folder): only the sampler is under test."""

    def __init__(self, cfg, lengths):
        from emoverse.prompting import Encoded

        self.cfg, self.rank, self._orders = cfg, 0, {}
        self.data = {"msa": [Encoded([1] * n, [1] * n, [False] * n) for n in lengths]}


def test_length_buckets_batch_neighbours_and_cover_the_pool():
    import random

    lengths = [random.Random(i).randint(10, 400) for i in range(200)]
    cfg = TrainConfig(batch_size=8, max_batch_tokens=10_000, length_buckets=True)
    pool = _Pool(cfg, lengths)
    seen = set()
    for step in range(400):
        _, items = pool.sample_batch(0, step)
        widths = [len(e.input_ids) for e in items]
        assert len(items) == 8
        assert max(widths) - min(widths) <= 40  # neighbours in length order
        seen.update(id(e) for e in items)
    assert len(seen) > 0.9 * len(lengths)
    # the same step draws the same batch (resume depends on it)
    assert [id(e) for e in pool.sample_batch(0, 7)[1]] == [id(e) for e in pool.sample_batch(0, 7)[1]]
    # the token budget caps a batch of long records
    cfg_small = TrainConfig(batch_size=8, max_batch_tokens=800, length_buckets=True)
    for step in range(50):
        _, items = _Pool(cfg_small, lengths).sample_batch(0, step)
        longest = max(len(e.input_ids) for e in items)
        assert len(items) * longest <= 800 or len(items) == 1


def test_compiled_decoder_gives_the_eager_loss_and_gradients():
    """`compile: true` compiles the decoder stack in place: same loss and LoRA gradients as eager, and the
    weights keep their state_dict keys (checkpoints and releases read them)."""
    m = _model()
    batch = _batch(m)
    params = list(m.trainable_parameters().values())
    eager = m(batch, response_loss_only=True)
    g_eager = torch.autograd.grad(eager, params, allow_unused=True)
    keys = list(m.state_dict())
    m.compile_decoder()
    compiled = m(batch, response_loss_only=True)
    g_compiled = torch.autograd.grad(compiled, params, allow_unused=True)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_eager, g_compiled, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert list(m.state_dict()) == keys


def test_eager_attention_gives_the_sdpa_loss_and_gradients():
    """`attention: eager` swaps the attention kernel only: same loss and LoRA gradients as the default sdpa
    on a padded batch (fp32), and within bf16 tolerance under autocast."""
    m = _model()
    batch = _batch(m)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding is exercised
    params = list(m.trainable_parameters().values())
    losses, grads = {}, {}
    for impl in ("sdpa", "eager"):
        m.set_attention(impl)
        assert m.causal_lm.config._attn_implementation == impl
        losses[impl] = m(batch, response_loss_only=True)
        grads[impl] = torch.autograd.grad(losses[impl], params, allow_unused=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl + "-bf16"] = m(batch, response_loss_only=True).item()
    assert torch.allclose(losses["sdpa"], losses["eager"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["sdpa"], grads["eager"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert abs(losses["sdpa-bf16"] - losses["eager-bf16"]) / losses["sdpa-bf16"] < 0.02


def test_unknown_attention_is_refused():
    import pytest

    with pytest.raises(ValueError, match="attention='flash'"):
        _model().set_attention("flash")
    with pytest.raises(ValueError, match="attention='flash'"):
        Trainer(TrainConfig(attention="flash", model=ModelConfig(**TINY)))


def _ecpe_items(m: EmoVerse) -> list:
    """Three targets of one conversation (they share it and part of the candidate list), one of another,
    and two records with the same prompt but different responses."""
    ecpe, mer = TASKS["ecpe"], TASKS["mer"]
    talk = [("neutral", "Ann", "I got the job"), ("joy", "Bob", "That is great news"), ("surprise", "Ann", "Really?")]
    other = [("anger", "Cy", "You broke it"), ("sadness", "Di", "I am sorry")]
    return [
        m.prompts.encode(ecpe.query(talk, 2), "2_joy,1", [], []),
        m.prompts.encode(ecpe.query(talk, 3), "3_surprise,2;3_surprise,3", [], []),
        m.prompts.encode(ecpe.query(other, 2), "2_sadness,1", [], []),
        m.prompts.encode(ecpe.query(talk, 1), "1_neutral,1", [], []),
        m.prompts.encode(mer.query("no way"), "Surprise.", [], []),
        m.prompts.encode(mer.query("no way"), "Anger.", [], []),
    ]


def test_shared_prefix_packing_gives_the_unpacked_loss_and_gradients():
    """`pack_tasks`: the batch as one prefix-tree row (4-D mask, own positions) trains exactly what
    the padded batch trains: same loss and LoRA gradients, with either attention kernel, in fewer tokens."""
    m = _model()
    items = _ecpe_items(m)
    padded, packed = m.prompts.collate(items), m.prompts.collate_packed(items)
    assert packed["input_ids"].shape[1] < int(padded["attention_mask"].sum())  # the shared prefixes are once
    assert packed["n_tokens"] == padded["n_tokens"] == int(padded["attention_mask"].sum())
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    params = list(m.trainable_parameters().values())
    for impl in ("sdpa", "eager"):
        m.set_attention(impl)
        ref = m(padded, response_loss_only=True)
        got = m(packed, response_loss_only=True)
        assert torch.allclose(ref, got, rtol=1e-5, atol=1e-6), impl
        for a, b in zip(
            torch.autograd.grad(ref, params, allow_unused=True),
            torch.autograd.grad(got, params, allow_unused=True),
            strict=True,
        ):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, got16 = m(padded, response_loss_only=True).item(), m(packed, response_loss_only=True).item()
        assert abs(ref16 - got16) / ref16 < 0.02, impl
    full = m(packed).loss  # the full-logits path takes the packed row too
    assert torch.allclose(full, m(padded).loss, rtol=1e-5, atol=1e-6)


def test_packed_tree_shares_prefixes_and_keeps_each_response_its_own():
    from emoverse.prompting import Encoded, packable, packed_sizes, packed_tree

    ig = -100
    a = Encoded([1, 2, 3, 4, 9], [ig, ig, ig, ig, 9], [False] * 5)
    b = Encoded([1, 2, 3, 5, 8], [ig, ig, ig, ig, 8], [False] * 5)
    same_prompt = Encoded([1, 2, 3, 4, 7], [ig, ig, ig, ig, 7], [False] * 5)
    tokens, parents, labels = packed_tree([a, b, same_prompt])
    # 1 2 3 shared; a: 4 9; b: 5 8; the same prompt as a: its own 4 (last prompt token) and 7
    assert tokens == [1, 2, 3, 4, 9, 5, 8, 4, 7]
    assert parents == [-1, 0, 1, 2, 3, 2, 5, 2, 7]
    assert labels == [ig, ig, ig, ig, 9, ig, 8, ig, 7]
    assert all(parents[i] == i - 1 for i, label in enumerate(labels) if label != ig)  # the loss's shift holds
    assert packed_sizes([a, b, same_prompt]) == [5, 7, 9]  # the row of items[:1], items[:2], all three
    assert not packable([a, Encoded([1, 2], [ig, ig], [False, False])])  # no response
    from emoverse.prompting import MediaRef

    assert not packable([Encoded([1, 2, 3], [ig, ig, 3], [False, True, False], [MediaRef("x.png")])])


def test_packed_draws_take_token_order_neighbours_within_the_budget():
    """The packing sampler: neighbours in token order (one conversation's targets together), the packed row
    within pack_max_tokens, the same batch for the same step (resume)."""
    import random

    from emoverse.prompting import Encoded, packed_tree

    ig = -100
    pool = []
    for conv in range(30):  # 30 conversations of 2-7 targets: a 60-token conversation, then 20 own tokens
        shared = [100 + conv] + [random.Random(conv).randint(5, 50) for _ in range(59)]
        for t in range(2 + conv % 6):
            own = [200 + t] * 19 + [7]
            pool.append(Encoded(shared + own, [ig] * 79 + [7], [False] * 80))
    random.Random(0).shuffle(pool)
    cfg = TrainConfig(batch_size=16, pack_max_tokens=300, pack_tasks=["msa"], length_buckets=True)
    trainer = _Pool(cfg, [])
    trainer.data = {"msa": pool}  # the default stage samples msa
    for step in range(100):
        _, items = trainer.sample_batch(0, step)
        assert len(packed_tree(items)[0]) <= 300 or len(items) == 1  # the row collate_packed lays out
        assert len(items) > 300 // 80  # more records than unpacked batches of 80 tokens would hold
        firsts = [e.input_ids[0] for e in items]
        assert firsts == sorted(firsts)  # token order: a conversation's targets are neighbours
    assert [id(e) for e in trainer.sample_batch(0, 3)[1]] == [id(e) for e in trainer.sample_batch(0, 3)[1]]
