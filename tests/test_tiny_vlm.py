"""The bundled VLM's structure: the split, the KV cache and the shared-prefix training path."""
import numpy as np
import torch
import torch.nn.functional as F

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.data import pack_qas, training_questions
from progvlm.models.tiny_vlm import TinyVLM, TinyVLMConfig, question_ids
from progvlm.questions import QUESTION_TYPES, encode_words
from progvlm.scenes import generate_scene, render_scene


def _random_model(seed=0):
    torch.manual_seed(seed)
    m = TinyVLM(TinyVLMConfig()).eval()
    with torch.no_grad():  # larger than init scale, so generations differ per input
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_shared_prefix_loss_equals_running_each_sequence_whole():
    m = _random_model()
    rng = np.random.default_rng(0)
    scenes = [generate_scene(s) for s in (1, 2)]
    text, mask = pack_qas([training_questions(s, rng) for s in scenes], m.cfg.max_text_len)
    pixels = TinyVLMBackend(m).pixels([render_scene(s) for s in scenes])
    cells = torch.zeros(2, 64, 3, dtype=torch.long)
    lm_loss, _ = m.training_losses(pixels, cells, text, mask)
    # reference: visual tokens + text as one sequence through the plain causal LM
    tokens = m.visual_tokens(pixels)
    losses = []
    for b in range(2):
        for q in range(text.shape[1]):
            seq = torch.cat([tokens[b:b + 1], m.lm.tok(text[b, q][None])], 1)
            hidden, _ = m.lm.forward_embeds(seq, 0)
            logits = m.lm.logits(hidden[0, tokens.shape[1]:-1])
            tgt, msk = text[b, q, 1:], mask[b, q, 1:]
            losses.append(F.cross_entropy(logits[msk], tgt[msk], reduction="sum"))
    ref = torch.stack(losses).sum() / mask[..., 1:].sum()
    assert torch.allclose(lm_loss, ref, atol=1e-5)


def test_kv_cache_generation_equals_recomputing_the_whole_sequence():
    m = _random_model(1)
    tokens = m.visual_tokens(TinyVLMBackend(m).pixels([render_scene(generate_scene(3))]))
    q = torch.tensor([question_ids(encode_words("describe the scene ."))])
    fast = m.generate(tokens, q, max_new=8)[0].tolist()
    seq = q
    slow = []
    with torch.no_grad():
        for _ in range(len(fast)):
            hidden, _ = m.lm.forward_embeds(torch.cat([tokens, m.lm.tok(seq)], 1), 0)
            nxt = int(m.lm.logits(hidden[0, -1]).argmax())
            slow.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert fast == slow


def test_split_equals_whole_model_for_the_bundled_backend(bundled_backend):
    rng = np.random.default_rng(5)
    for seed in range(6):
        scene = generate_scene(500 + seed)
        img = render_scene(scene)
        tokens = bundled_backend.edge_half(img)
        assert tokens.shape == (64, bundled_backend.token_dim)
        for qa in training_questions(scene, rng):
            whole = bundled_backend.answer(img, qa.question)
            split = bundled_backend.cloud_half(tokens, qa.question)
            assert split.token_ids == whole.token_ids and split.text == whole.text


def test_batched_cloud_half_equals_one_at_a_time(bundled_backend):
    scene = generate_scene(77)
    tokens = bundled_backend.edge_half(render_scene(scene))
    qs = [qa.question for qa in training_questions(scene, np.random.default_rng(0))]
    batched = bundled_backend.cloud_half_batch([tokens] * len(qs), qs)
    assert [a.text for a in batched] == [bundled_backend.cloud_half(tokens, q).text for q in qs]


def test_bundled_model_answers_example_questions(bundled_backend):
    """The shipped weights are trained: they answer most suggested questions right."""
    from progvlm.examples import load_examples
    right = total = 0
    for ex in load_examples():
        tokens = bundled_backend.edge_half(render_scene(ex["scene"]))
        for q in ex["questions"]:
            right += bundled_backend.cloud_half(tokens, q["question"]).text == q["answer"]
            total += 1
    assert right / total >= 0.9, f"{right}/{total}"
