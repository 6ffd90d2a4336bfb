"""The bundled VLM's structure: the split, the KV cache and the shared-prefix training path."""
import numpy as np
import torch

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.toyworld.data import pack_qas, training_questions
from progvlm.toyworld.questions import question_ids
from progvlm.toyworld.tiny_vlm import TinyVLM, TinyVLMConfig
from progvlm.toyworld.questions import QUESTION_TYPES, encode_words
from progvlm.toyworld.scenes import generate_scene, render_scene


def _random_model(seed=0):
    torch.manual_seed(seed)
    m = TinyVLM(TinyVLMConfig()).eval()
    with torch.no_grad():  # larger than init scale, so generations differ per input
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_shared_prefix_teacher_forcing_equals_each_sequence_alone():
    """Training runs each image's visual prefix once for all its questions; every row must
    equal that sequence run whole, in generate()'s layout."""
    m = _random_model()
    rng = np.random.default_rng(0)
    scenes = [generate_scene(s) for s in (1, 2)]
    qas = [training_questions(s, rng) for s in scenes]
    text, mask = pack_qas(qas, m.cfg.max_text_len)
    tokens = m.visual_tokens(TinyVLMBackend(m).pixels([render_scene(s) for s in scenes]))
    with torch.no_grad():
        batched = m.teacher_forced_logits(tokens, text)
        for b in range(2):
            for q, qa in enumerate(qas[b]):
                prompt = torch.tensor([question_ids(encode_words(qa.question))])
                answer = text[b, q, prompt.shape[1]:][None]
                seq = torch.cat([m._prompt(tokens[b:b + 1], prompt),
                                 m.lm.embed_text(answer, prompt.shape[1])], 1)
                hidden, _ = m.lm.forward_embeds(seq)
                alone = m.lm.logits(hidden[0, -answer.shape[1] - 1:-1])
                row = batched[b * text.shape[1] + q, prompt.shape[1] - 1:]
                assert torch.allclose(row, alone, atol=1e-4)


def test_kv_cache_generation_equals_recomputing_the_whole_sequence():
    m = _random_model(1)
    tokens = m.visual_tokens(TinyVLMBackend(m).pixels([render_scene(generate_scene(3))]))
    q = torch.tensor([question_ids(encode_words("describe the scene ."))])
    fast = m.generate(tokens, q, max_new=8)[0].tolist()
    slow = []
    with torch.no_grad():
        for _ in range(len(fast)):
            ans = torch.tensor([slow], dtype=torch.long).view(1, -1)
            seq = torch.cat([m._prompt(tokens, q), m.lm.embed_text(ans, q.shape[1])], 1)
            hidden, _ = m.lm.forward_embeds(seq)
            slow.append(int(m.lm.logits(hidden[0, -1]).argmax()))
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
    from progvlm.toyworld.examples import load_examples
    right = total = 0
    for ex in load_examples():
        tokens = bundled_backend.edge_half(render_scene(ex["scene"]))
        for q in ex["questions"]:
            right += bundled_backend.cloud_half(tokens, q["question"]).text == q["answer"]
            total += 1
    assert right / total >= 0.9, f"{right}/{total}"


def test_focus_supervision_reads_the_attention_over_visual_tokens():
    """The focus loss sees a real attention distribution over the 64 cells, and its targets
    point at the objects each answer word is about."""
    m = _random_model(2)
    rng = np.random.default_rng(1)
    scenes = [generate_scene(s) for s in (4, 5)]
    text, mask, focus = pack_qas([training_questions(s, rng) for s in scenes],
                                 m.cfg.max_text_len, scenes)
    pixels = TinyVLMBackend(m).pixels([render_scene(s) for s in scenes])
    cells = torch.zeros(2, 64, 3, dtype=torch.long)
    lm, aux, focus_loss = m.training_losses(pixels, cells, text, mask, focus)
    assert torch.isfinite(focus_loss) and focus_loss > 0
    focus_loss.backward()
    assert m.lm.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it trains the LM's attention
    assert m.lm.blocks[m.cfg.focus_layer].attn.captured is None  # instrumentation switched off
    assert focus[mask].any(-1).any(-1).sum() >= len(scenes)  # some words have objects to look at
