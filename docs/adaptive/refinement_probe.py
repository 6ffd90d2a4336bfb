"""Issue 20, measured: does a cloud-side "would a plausible refinement change the answer?" probe
add to the learned sufficiency rule (assets/mae/adaptive.json)?

    python docs/adaptive/refinement_probe.py collect --stream 2 --seed 1 --questions 2000 --out s1.json
    python docs/adaptive/refinement_probe.py collect --stream 1 --seed 0 --start 50000 --out cal.json
    python docs/adaptive/refinement_probe.py conditional s1.json --seed 1   (each file; cal.json:
                                            --stream 1 --seed 0 --start 50000)
    python docs/adaptive/refinement_probe.py report --calibration cal.json s1.json s2.json s3.json

`collect`: every question answered from k = 1..L layers (as eval-mae's ladder: the same scenes,
questions, wire bytes and answers), and, for k = 1 (`--probe-layers`), `--samples` refinements
the cloud can make without the edge, each answered by the language half (one batch):

* prior: layer k + 1's codes drawn per token from the quantiser's code frequencies (the range
  coder's usage table, which the cloud holds), added to the latent of k layers, decoded as k + 1;
* noise: the latent of k layers plus Gaussian noise of stage k's typical residual (the
  quantiser's typical_dist), decoded as k;
* conditional (`conditional`, added to a collected file): layer 2's code drawn per token from
  P(layer-2 code | that token's layer-1 code), counted on calibration scenes (TABLE_SCENES),
  decoded as k = 2, 8 refinements: what progvlm/adaptive_probe.py ships.

The probe's signal is the fraction of refinements whose answer is the answer at k.

`report`: AUROC of "the answer at k is the answer at L" (over all answers at k < L, and at
k = 1) for the shipped learned rule and the probes; the adaptive policy (stop at the first k
whose score ≥ τ) under the shipped rule, the rule gated by the probe (stop only where every
refinement agrees) and a logistic combination, each τ chosen on the calibration file within
1.2× k = 1's bytes (progvlm.adaptive.BYTES_BUDGET) and evaluated on the others, plus each
one's best τ *on the evaluation file itself* (an in-sample upper bound), and one τ per question
type (coordinate ascent, on the calibration file and in-sample). Host CPU, one thread.

`variants`: other refinements at k = 1 (VARIANTS) on one evaluation file, in-sample bounds.
`time`: what the shipped probe costs the cloud (batch 1, one thread): Split.cloud of adaptive's
first answer with and without it, and its own time checked by one teacher-forced pass (shipped)
or by generating the refinements' answers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

KINDS = ("prior", "noise", "conditional")
#: the conditional probe's table: layer-2 code given layer-1 code, counted on these scenes of the
#: training stream (the calibration scenes, never the evaluation stream)
TABLE_SCENES = dict(stream=1, seed=0, count=1500, start=50_000)


def collect(stream: int, seed: int, start: int, count: int, samples: int, out: Path,
            probe_layers: tuple[int, ...] = (1,)) -> None:
    import torch
    from progvlm.eval.evaluate import eval_questions
    from progvlm.split import Frame, load_split
    from progvlm.toyworld.scenes import render_scene
    torch.set_num_threads(1)
    split = load_split()
    vlm, mae, q, L = split.vlm, split.mae, split.mae.quantiser, split.num_layers
    scenes, qa = eval_questions(seed, count, stream, start)
    gen = torch.Generator().manual_seed(1234)
    usage = q.usage / q.usage.sum(1, keepdim=True)
    rows, probe_ms, t0 = [], 0.0, time.time()
    for s0 in range(0, len(scenes), 32):
        ids = list(range(s0, min(len(scenes), s0 + 32)))
        toks = vlm.edge_half_batch([render_scene(scenes[s]) for s in ids])
        items = [(j, s, a) for j, (s, a) in enumerate(qa) if s in ids]
        latent, nbytes = {}, {}
        with torch.no_grad():
            for s, tk in zip(ids, toks):
                layers = mae.compress(tk)
                idx = torch.from_numpy(mae.edge_codec().decode_indices(layers, tk.shape[0]))
                latent[s] = [q.get_output_from_indices(idx[:k]) for k in range(1, L + 1)]
                nbytes[s] = [len(split.pack(Frame(layers[:k], tk.shape[0]))) for k in range(1, L + 1)]
            dec = {(s, k): t for k in range(1, L + 1) for s, t in
                   zip(ids, mae.decode_latent(torch.stack([latent[s][k - 1] for s in ids]), k))}
            probe = {}
            for k in probe_layers:
                for kind in KINDS:
                    lats = []
                    for s in ids:
                        base = latent[s][k - 1]
                        for _ in range(samples):
                            if kind == "prior":
                                c = torch.multinomial(usage[k], base.shape[0], True, generator=gen)
                                lats.append(base + q.codebooks[k][c])
                            else:
                                sd = (q.typical_dist[k - 1] / base.shape[1]).sqrt()
                                lats.append(base + sd * torch.randn(base.shape, generator=gen))
                    got = mae.decode_latent(torch.stack(lats), k + 1 if kind == "prior" else k)
                    for i, s in enumerate(ids):
                        probe[(s, k, kind)] = got[i * samples:(i + 1) * samples]
        reqs = [(dec[(s, k)], a.question, ("k", j, k)) for j, s, a in items for k in range(1, L + 1)]
        ans = dict(zip([r[2] for r in reqs], vlm.cloud_half_batch([r[0] for r in reqs], [r[1] for r in reqs])))
        preqs = [(t, a.question, (j, k, kind)) for j, s, a in items for k in probe_layers
                 for kind in KINDS for t in probe[(s, k, kind)]]
        tp = time.perf_counter()
        got = vlm.cloud_half_batch([r[0] for r in preqs], [r[1] for r in preqs])
        probe_ms += 1e3 * (time.perf_counter() - tp)
        texts: dict = {}
        for r, g in zip(preqs, got):
            texts.setdefault(r[2], []).append(g.text)
        for j, s, a in items:
            rows.append({"q": a.question, "qtype": a.qtype, "truth": a.answer, "bytes": nbytes[s],
                         "ans": [(ans[("k", j, k)].text, ans[("k", j, k)].token_ids,
                                  ans[("k", j, k)].token_probs, ans[("k", j, k)].runner_up_probs)
                                 for k in range(1, L + 1)],
                         "probe": {(k, kind): texts[(j, k, kind)] for k in probe_layers for kind in KINDS}})
        print(f"{len(rows)} questions, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if len(rows) % 640 < len(items):  # a partial file now and then: long runs can be cut
            _dump(out, rows, samples, probe_ms / max(1, len(rows) * len(probe_layers)))
    _dump(out, rows, samples, probe_ms / max(1, len(rows) * len(probe_layers)))


def _dump(out: Path, rows: list, samples: int, probe_ms: float) -> None:
    _write({"rows": rows, "samples": samples, "probe_ms_per_question_and_k": probe_ms}, out)


# a collected file is plain JSON (never pickle); a row's probe texts are keyed "k:kind"
def _write(blob: dict, path: Path) -> None:
    rows = [{**r, "probe": {f"{k}:{kind}": t for (k, kind), t in r["probe"].items()}}
            for r in blob["rows"]]
    Path(path).write_text(json.dumps({**blob, "rows": rows}))


def _read(path: Path) -> dict:
    blob = json.loads(Path(path).read_text())
    for r in blob["rows"]:
        r["probe"] = {(int(key.split(":")[0]), key.split(":")[1]): t for key, t in r["probe"].items()}
    return blob


# ---- report ---------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    from progvlm.adaptive import AdaptiveRule
    from progvlm.backends.base import Answer
    from progvlm.models.mae import DEFAULT_MAE
    blob = _read(path)
    rows = blob["rows"]
    answers = [[Answer(t, ids, token_probs=p, runner_up_probs=r) for t, ids, p, r in x["ans"]] for x in rows]
    L = len(answers[0])
    rule = AdaptiveRule.load(DEFAULT_MAE)
    probe = np.ones((len(rows), L, len(KINDS)))
    for i, x in enumerate(rows):
        for k in range(1, L):
            for c, kind in enumerate(KINDS):  # a k without a probe: every refinement agrees
                texts = x["probe"].get((k, kind), [x["ans"][k - 1][0]])
                probe[i, k - 1, c] = np.mean([t == x["ans"][k - 1][0] for t in texts])
    return {"correct": np.array([[a.text.strip() == x["truth"] for a in row] for row, x in zip(answers, rows)]),
            "agree_L": np.array([[a.text == row[-1].text for a in row] for row in answers]),
            "bytes": np.array([x["bytes"] for x in rows], float), "probe": probe, "rule": rule,
            "learned": np.array([[rule.confidence(a, x["q"]) for a in row] for row, x in zip(answers, rows)]),
            "probe_ms": blob.get("probe_ms_per_question_and_k"), "qtype": [x["qtype"] for x in rows]}


def _policy(score, d, tau) -> tuple[float, float]:
    s = score.copy()
    s[:, -1] = np.inf
    k = (s >= tau).argmax(1)
    rows = np.arange(len(k))
    return float(d["correct"][rows, k].mean()), float(d["bytes"][rows, k].mean() / d["bytes"][:, 0].mean())


def _best_tau(score, d, budget) -> float:
    best = None
    for tau in np.unique(np.quantile(score[:, :-1], np.linspace(0, 1, 801))):
        acc, ratio = _policy(score, d, tau)
        if ratio <= budget and (best is None or (acc, -ratio) > best[:2]):
            best = (acc, -ratio, float(tau))
    return best[2]


def _per_type_taus(score, d, budget, rounds: int = 3) -> dict:
    """One τ per question type (coordinate ascent from the best single τ): the most correct
    answers within the budget, ties to fewer bytes."""
    types = sorted(set(d["qtype"]))
    start = _best_tau(score, d, budget)
    taus = {t: start for t in types}
    grid = np.unique(np.quantile(score[:, :-1], np.linspace(0, 1, 201)))
    for _ in range(rounds):
        for t in types:
            best = None
            for g in grid:
                acc, ratio = _policy(_per_type(score, d, {**taus, t: g}), d, 0.0)
                if ratio <= budget and (best is None or (acc, -ratio) > best[:2]):
                    best = (acc, -ratio, float(g))
            taus[t] = best[2] if best is not None else taus[t]
    return taus


def _per_type(score, d, taus) -> np.ndarray:
    """score - τ(question type): ≥ 0 where the per-type rule stops."""
    return score - np.array([taus.get(t, 1.0) for t in d["qtype"]])[:, None]


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _combo_features(d):
    return np.concatenate([_logit(d["learned"])[..., None], d["probe"]], -1)


def _fit_combo(d):
    """Logistic regression of agreement with L on [logit(learned), probe fractions] (the
    calibration file's answers at k < L); returns the scoring function."""
    n = 1 + len(KINDS)
    x = _combo_features(d)[:, :-1].reshape(-1, n)
    y = d["agree_L"][:, :-1].ravel().astype(float)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w = np.zeros(n + 1)
    for _ in range(50):  # Newton's method, a small L2 penalty
        p = 1 / (1 + np.exp(-np.clip(z @ w, -60, 60)))
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(z) + 1e-3 * np.eye(n + 1)
        w -= np.linalg.solve(hess, z.T @ (p - y) / len(z) + 1e-3 * w)

    def score(e):
        ze = np.c_[(_combo_features(e).reshape(-1, n) - mean) / scale, np.ones(e["learned"].size)]
        return (1 / (1 + np.exp(-np.clip(ze @ w, -60, 60)))).reshape(e["learned"].shape)
    return score


def _scores(d, combo) -> dict:
    gate = lambda m: np.where(m, 0.0, d["learned"])
    return {"learned": d["learned"],
            "learned, gated by prior probe": gate(d["probe"][..., 0] < 1),
            "learned, gated by prior and noise probes": gate(d["probe"][..., :2].min(-1) < 1),
            "learned, gated by conditional probe": gate(d["probe"][..., 2] < 1),
            "logistic(learned, probes)": combo(d)}


def report(calibration: Path, evaluation: list[Path]) -> dict:
    from progvlm.adaptive import ACCURACY_SLACK, BYTES_BUDGET
    from progvlm.adaptive_learned import auroc
    cal = _load(calibration)
    combo = _fit_combo(cal)
    cal_scores = _scores(cal, combo)
    taus = {name: _best_tau(s, cal, BYTES_BUDGET) for name, s in cal_scores.items()}
    per_type_taus = {name: _per_type_taus(cal_scores[name], cal, BYTES_BUDGET)
                     for name in ("learned", "learned, gated by conditional probe")}
    out = {"calibration": calibration.name, "budget": BYTES_BUDGET, "accuracy_slack": ACCURACY_SLACK,
           "shipped_threshold": cal["rule"].threshold, "per_file": {}}
    for path in evaluation:
        d = _load(path)
        goal = float(d["correct"][:, -1].mean())
        row = {"questions": len(d["correct"]), "k1_accuracy": float(d["correct"][:, 0].mean()),
               "kL_accuracy": goal, "oracle": _policy(np.where(d["correct"], 1.0, 0.0), d, 0.5),
               "probe_ms_per_question_and_k": d["probe_ms"]}
        for c, kind in enumerate(KINDS):
            row[f"probe_{kind}_auroc"] = {"all_k": auroc(d["probe"][:, :-1, c].ravel(), d["agree_L"][:, :-1].ravel()),
                                          "k1": auroc(d["probe"][:, 0, c], d["agree_L"][:, 0])}
        taus_here = {**taus, "learned, shipped τ (adaptive.json)": cal["rule"].threshold}
        scores = _scores(d, combo)
        scores["learned, shipped τ (adaptive.json)"] = d["learned"]
        for name, s in scores.items():
            acc, ratio = _policy(s, d, taus_here[name])
            in_acc, in_ratio = _policy(s, d, _best_tau(s, d, BYTES_BUDGET))
            row[name] = {"tau": taus_here[name], "accuracy": acc, "bytes_ratio": ratio,
                         "goal_met": acc >= goal - ACCURACY_SLACK and ratio <= BYTES_BUDGET,
                         "auroc_all_k": auroc(s[:, :-1].ravel(), d["agree_L"][:, :-1].ravel()),
                         "auroc_k1": auroc(s[:, 0], d["agree_L"][:, 0]),
                         "in_sample_best": {"accuracy": in_acc, "bytes_ratio": in_ratio}}
        for name in ("learned", "learned, gated by conditional probe"):
            s = scores[name]
            t_cal = per_type_taus[name]
            acc, ratio = _policy(_per_type(s, d, t_cal), d, 0.0)
            in_acc, in_ratio = _policy(_per_type(s, d, _per_type_taus(s, d, BYTES_BUDGET)), d, 0.0)
            row[name + ", τ per question type"] = {
                "tau": t_cal, "accuracy": acc, "bytes_ratio": ratio,
                "goal_met": acc >= goal - ACCURACY_SLACK and ratio <= BYTES_BUDGET,
                "in_sample_best": {"accuracy": in_acc, "bytes_ratio": in_ratio}}
        out["per_file"][path.name] = row
    return out


#: the other refinements tried at k = 1 (`variants`): name → (samples, how they are made)
VARIANTS = {"prior8": (8, "layer 2's codes from the usage prior on every token, decoded as k = 2"),
            "prior_obj4": (4, "the same on tokens whose layer-1 code is not the most frequent one"),
            "swap4": (4, "15% of those tokens' layer-1 codes swapped for one of their 3 nearest codes"),
            "k2label": (1, "the latent of layer 1 decoded as if it were k = 2"),
            "kLlabel": (1, "the latent of layer 1 decoded as if it were k = L")}


def transition_table(split):
    """(K, K) P(layer-2 code | layer-1 code) over TABLE_SCENES' tokens (0.1 added to every count)."""
    import torch
    from progvlm.toyworld.data import scenes as make_scenes
    from progvlm.toyworld.scenes import render_scene
    mae = split.mae
    K = mae.quantiser.codebooks.shape[1]
    counts = torch.ones(K, K) * 0.1
    scenes = make_scenes(**TABLE_SCENES)
    for s0 in range(0, len(scenes), 64):
        for tk in split.vlm.edge_half_batch([render_scene(s) for s in scenes[s0:s0 + 64]]):
            idx = torch.from_numpy(mae.edge_codec().decode_indices(mae.compress(tk, 2), tk.shape[0]))
            counts.index_put_((idx[0], idx[1]), torch.ones(idx.shape[1]), accumulate=True)
    return counts / counts.sum(1, keepdim=True)


def conditional(ladder_file: Path, stream: int, seed: int, start: int, samples: int = 8) -> None:
    """Add the conditional probe at k = 1 to a `collect` file (same stream, seed, start): layer 2's
    code drawn per token from P(layer-2 code | its layer-1 code) (transition_table), decoded as
    k = 2, `samples` refinements per question answered in one batch."""
    import torch
    from progvlm.eval.evaluate import eval_questions
    from progvlm.split import load_split
    from progvlm.toyworld.scenes import render_scene
    torch.set_num_threads(1)
    blob = _read(ladder_file)
    split = load_split()
    vlm, mae, q = split.vlm, split.mae, split.mae.quantiser
    table = transition_table(split)
    scenes, qa = eval_questions(seed, len(blob["rows"]), stream, start)
    gen = torch.Generator().manual_seed(7)
    texts: dict = {}
    for s0 in range(0, len(scenes), 32):
        ids = list(range(s0, min(len(scenes), s0 + 32)))
        lats = []
        with torch.no_grad():
            for tk in vlm.edge_half_batch([render_scene(scenes[s]) for s in ids]):
                i1 = torch.from_numpy(mae.edge_codec().decode_indices(mae.compress(tk, 1), tk.shape[0]))[0]
                for _ in range(samples):
                    c2 = torch.multinomial(table[i1], 1, generator=gen)[:, 0]
                    lats.append(q.codebooks[0][i1] + q.codebooks[1][c2])
            decoded = mae.decode_latent(torch.stack(lats), 2)
        reqs = [(decoded[ids.index(s) * samples + r], a.question, j)
                for j, (s, a) in enumerate(qa) if s in ids for r in range(samples)]
        for r, got in zip(reqs, vlm.cloud_half_batch([r[0] for r in reqs], [r[1] for r in reqs])):
            texts.setdefault(r[2], []).append(got.text)
    for j, row in enumerate(blob["rows"]):
        assert row["q"] == qa[j][1].question, "not the questions of this file"
        row["probe"][(1, "conditional")] = texts[j]
    _write(blob, ladder_file)


def variants(ladder_file: Path, seed: int, out: Path) -> dict:
    """The VARIANTS on the questions of an evaluation file collected with `--seed seed` (stream
    2): each one's AUROC at k = 1, how often it fires, and the in-sample best of the learned rule
    gated by it at k = 1 (the most that variant could give on that file)."""
    import torch
    from progvlm.adaptive import ACCURACY_SLACK, BYTES_BUDGET
    from progvlm.adaptive_learned import auroc
    from progvlm.eval.evaluate import eval_questions
    from progvlm.split import load_split
    from progvlm.toyworld.scenes import render_scene
    torch.set_num_threads(1)
    d, rows = _load(ladder_file), _read(ladder_file)["rows"]
    split = load_split()
    vlm, mae, q, L = split.vlm, split.mae, split.mae.quantiser, split.num_layers
    scenes, qa = eval_questions(seed, len(rows), 2, 0)
    gen = torch.Generator().manual_seed(99)
    usage = q.usage / q.usage.sum(1, keepdim=True)
    cb0 = q.codebooks[0]
    near = torch.cdist(cb0, cb0).fill_diagonal_(float("inf")).argsort(1)[:, :3]
    texts: dict = {}
    for s0 in range(0, len(scenes), 32):
        ids = list(range(s0, min(len(scenes), s0 + 32)))
        lats, labels, keys = [], [], []
        with torch.no_grad():
            for s, tk in zip(ids, vlm.edge_half_batch([render_scene(scenes[s]) for s in ids])):
                idx = torch.from_numpy(mae.edge_codec().decode_indices(mae.compress(tk, 1), tk.shape[0]))[0]
                base, n = cb0[idx], len(idx)
                obj = idx != usage[0].argmax()
                for name, (count, _) in VARIANTS.items():
                    for _ in range(count):
                        label = 1 if name == "swap4" else L if name == "kLlabel" else 2
                        if name.startswith("prior"):
                            add = q.codebooks[1][torch.multinomial(usage[1], n, True, generator=gen)]
                            lat = base + (add * obj[:, None] if name == "prior_obj4" else add)
                        elif name == "swap4":
                            pick = (torch.rand(n, generator=gen) < 0.15) & obj
                            lat = cb0[torch.where(pick, near[idx, torch.randint(3, (n,), generator=gen)], idx)]
                        else:
                            lat = base
                        lats.append(lat), labels.append(label), keys.append((s, name))
            decoded = dict(zip(range(len(keys)), mae.decode_latent(torch.stack(lats), torch.tensor(labels))))
        reqs = [(decoded[i], a.question, (j, key[1])) for j, (s, a) in enumerate(qa) if s in ids
                for i, key in enumerate(keys) if key[0] == s]
        for r, got in zip(reqs, vlm.cloud_half_batch([r[0] for r in reqs], [r[1] for r in reqs])):
            texts.setdefault(r[2], []).append(got.text)
    first = [x["ans"][0][0] for x in rows]
    goal = float(d["correct"][:, -1].mean())
    result = {"file": ladder_file.name, "kL_accuracy": goal, "goal": goal - ACCURACY_SLACK,
              "learned_in_sample_best": _policy(d["learned"], d, _best_tau(d["learned"], d, BYTES_BUDGET))}
    for name, (count, how) in VARIANTS.items():
        agree = np.array([np.mean([t == first[j] for t in texts[(j, name)]]) for j in range(len(rows))])
        gated = d["learned"].copy()
        gated[:, 0] = np.where(agree < 1, 0.0, gated[:, 0])
        result[name] = {"samples": count, "how": how, "auroc_k1": auroc(agree, d["agree_L"][:, 0]),
                        "fires": float((agree < 1).mean()),
                        "gated_in_sample_best": _policy(gated, d, _best_tau(gated, d, BYTES_BUDGET))}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def time_probe(repeats: int = 21) -> dict:
    """What the shipped probe costs the cloud, batch 1, one thread: the median ms of Split.cloud
    on adaptive's first answer (layer 1 of a stream that announced more, a question whose answer
    is sure without the probe, so the probe runs) with and without the probe, and the probe's
    own time (`probe_ms`) where its refinements are checked by one teacher-forced pass
    (TinyVLMBackend.gives_answers, shipped) and by generating their answers and comparing
    (VLMBackend's default, what any other backend does)."""
    import dataclasses
    import statistics
    import torch
    from progvlm.backends.base import VLMBackend
    from progvlm.split import load_split
    from progvlm.toyworld.scenes import generate_scene, render_scene
    torch.set_num_threads(1)
    split = load_split()
    frame = split.edge(render_scene(generate_scene(11)))
    first = dataclasses.replace(frame.prefix(1), layers_announced=frame.k)  # more to come
    question = "is the large cross above the purple object ?"
    rule, source = split.adaptive_rule()

    def median(run, key=None):
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = run()
            times.append(a.stage_ms[key] if key else 1e3 * (time.perf_counter() - t0))
        return round(statistics.median(times), 2)

    out = {"cloud_layer1_with_probe_ms": median(lambda: split.cloud(first, question)),
           "probe_ms_teacher_forced": median(lambda: split.cloud(first, question), "probe_ms")}
    split.vlm.gives_answers = lambda *a, **kw: VLMBackend.gives_answers(split.vlm, *a, **kw)
    out["probe_ms_generated"] = median(lambda: split.cloud(first, question), "probe_ms")
    del split.vlm.gives_answers
    split._adaptive = (dataclasses.replace(rule, probe=None), source)
    out["cloud_layer1_without_probe_ms"] = median(lambda: split.cloud(first, question))
    return {**out, "samples": rule.probe.samples,
            "note": "host CPU, one thread, batch 1, median of %d" % repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--stream", type=int, default=2)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--questions", type=int, default=2000)
    c.add_argument("--samples", type=int, default=4)
    c.add_argument("--probe-layers", default="1", help="the k (comma-separated) probed (default 1: "
                   "where nearly every decision is made)")
    c.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("--calibration", type=Path, required=True)
    r.add_argument("evaluation", type=Path, nargs="+")
    r.add_argument("--out", type=Path, default=None)
    sub.add_parser("time")
    c2 = sub.add_parser("conditional")
    c2.add_argument("file", type=Path, help="a file of `collect`, to which the probe is added")
    c2.add_argument("--stream", type=int, default=2)
    c2.add_argument("--seed", type=int, default=1)
    c2.add_argument("--start", type=int, default=0)
    c2.add_argument("--samples", type=int, default=8)
    v = sub.add_parser("variants")
    v.add_argument("file", type=Path, help="an evaluation file of `collect`")
    v.add_argument("--seed", type=int, required=True, help="the seed it was collected with")
    v.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "conditional":
        conditional(a.file, a.stream, a.seed, a.start, a.samples)
    elif a.cmd == "variants":
        variants(a.file, a.seed, a.out)
    elif a.cmd == "time":
        print(json.dumps(time_probe(), indent=1))
    elif a.cmd == "collect":
        collect(a.stream, a.seed, a.start, a.questions, a.samples, a.out,
                tuple(int(k) for k in a.probe_layers.split(",")))
    else:
        text = json.dumps(report(a.calibration, a.evaluation), indent=1)
        (a.out.write_text(text + "\n") if a.out else print(text))


if __name__ == "__main__":
    main()
