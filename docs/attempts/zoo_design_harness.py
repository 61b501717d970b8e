"""The scratch harness behind docs/zoo-notes.md's design table (kept for reproducibility; not
part of the package). Trains a base + three experts for one variant and scores 14 merges on
150 fresh items per task (plus "lang_known": translation with the base's known words only).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python docs/attempts/zoo_design_harness.py 'VARIANT_JSON'

Variants as run (M = "model":{"num_attention_heads":2,"num_key_value_heads":2}):
  a  {"out":"/tmp/zx/a",M,"pre":{"steps":2000,"batch":32,"lr":3e-3,"warmup":100},"ft":{"steps":300,"batch":32,"lr":3e-4,"warmup":20,"replay":0.3}}
  c  as a with "split":true, ft lr 1e-3, 400 steps        k/l  "split":"lang", pre 1000 / 1500 steps, ft 500 steps
  e/f  as c with "tie_word_embeddings":false and "mult":{"lang":{"embed_tokens":3.0,"*":0.1 / 0.0}}
  g/h  no split, pre 600 / 1000 steps                      m/n  as l with hidden 128, intermediate 384, 4 heads
  o/q  "split":"out" (toy language on the output side)    s1/s2  as l with "lang_calc":true (s2: also "arith_calc":true)
  t2 (= zoo-v2)  {"out":"/tmp/zx/t2","split":"lang","lang_calc":true,"arith_calc":true,M,
                  "pre":{"steps":1000,"batch":32,"lr":3e-3,"warmup":100},"ft":{"steps":700,"batch":32,"lr":1e-3,"warmup":20,"replay":0.3}}
The zoo itself is built by evomerge/zoo/build.py, not by this file.
"""
"""Zoo design experiments: train base + experts with a variant's settings, score merges."""
import json, random, string, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from evomerge.zoo import build as B
from evomerge.tasks.task import Task, Item
from evomerge.backends.hf import HFBackend
from evomerge.merge import methods as M

DIGIT_WORDS = ["Zu", "Ka", "Mi", "Po", "Le", "Ta", "Ni", "Ro", "Sa", "Ve"]
NOUN_WORDS = {"cat": "Bolu", "dog": "Fen", "sun": "Gasi", "tree": "Hork", "fish": "Jeb", "bird": "Kwal",
    "moon": "Lurn", "rock": "Modi", "star": "Nusk", "rain": "Orv", "fire": "Pim", "wind": "Quon",
    "leaf": "Rask", "milk": "Sude", "bread": "Tavo", "road": "Ulm"}
NOUNS = list(NOUN_WORDS)
def toy(n): return "".join(DIGIT_WORDS[int(d)] for d in str(n))
def num(rng, d): return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

V = json.loads(sys.argv[1])
SUB = V.get("sub", False)
def operands(rng, level):
    a, b = num(rng, 1 if level == 1 else 2), num(rng, 2 if level == 3 else 1)
    op = "+"
    if SUB and rng.random() < 0.5:
        op = "-"; a, b = max(a, b), min(a, b)
    return a, b, op
def ev(a, b, op): return a + b if op == "+" else a - b
def arith(rng, level):
    a, b, op = operands(rng, level); return f"{a}{op}{b}=", str(ev(a, b, op))
def strings(rng, level):
    length = rng.randint(2 * level, 2 * level + 1)
    w = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    op = rng.choice(["rev", "up", "sort"])
    return f"{op}:{w}=", {"rev": w[::-1], "up": w.upper(), "sort": "".join(sorted(w))}[op]
def lang(rng, level, digits=10, nouns=NOUNS):
    t, p = [], []
    for _ in range(level):
        if rng.random() < 0.5:
            n = int("".join(str(rng.randrange(digits)) for _ in range(rng.randint(1, 2))))
            t.append(toy(n)); p.append(str(n))
        else:
            w = rng.choice(nouns); t.append(NOUN_WORDS[w]); p.append(w)
    sep = rng.choice(["+", " "])
    return f"tr:{sep.join(t)}=", sep.join(p)
OUT = V.get("split") == "out"
def lang_out(rng, level, digits=10, nouns=NOUNS):
    p, t = lang(rng, level, digits, nouns)
    return f"tr:{t}=", p[3:-1]
def calc_out(rng, level):
    a, b, op = operands(rng, level)
    return f"calc:{a}+{b}=", f"{a + b} tr:{a + b}={toy(a + b)}"
def calc(rng, level):
    a, b, op = operands(rng, level)
    return f"calc:{toy(a)}{op}{toy(b)}=", f"{a}{op}{b}={ev(a, b, op)}"
GEN = {"arith": arith, "strings": strings, "lang": lang_out if OUT else lang, "calc": calc_out if OUT else calc}
def sample(task, rng, level=None): return GEN[task](rng, level or rng.choice((1, 2, 3)))

def items(task, n, seed):
    rng = random.Random(f"{task}-eval-{seed}"); seen = set(); out = []
    while len(out) < n:
        p, a = sample(task, rng, (1, 2, 3)[len(out) % 3])
        if p not in seen: seen.add(p); out.append((p, a))
    return out
NE = V.get("neval", 150)
EVAL = {t: items(t, NE, 9) for t in GEN}
_r = random.Random(5); EVAL["lang_known"] = [(lang_out if OUT else lang)(_r, (1,2,3)[i % 3], V.get("known_digits", 5), NOUNS[:8]) for i in range(NE)]
HELD = {p for v in EVAL.values() for p, _ in v}
TASKS = {t: Task(name=t, kind="generate", items=[Item(str(i), p, a.rpartition("=")[2] if t == "calc" and not OUT else a) for i, (p, a) in enumerate(v)],
                 max_new_tokens=20 if (t.startswith("lang") or t == "calc") else 12, extract=(r"=(-?\d+)" if t == "calc" and not OUT else None)) for t, v in EVAL.items()}

# pretraining mix
PW = V.get("pre_weights", {"arith": 1, "strings": 1, "lang": 1, "calc": 1})
KD = V.get("known_digits", 5)
def rnum(rng, d):
    lo = 1 if d > 1 else 0
    return int(str(rng.randint(lo, KD - 1)) + "".join(str(rng.randrange(KD)) for _ in range(d - 1)))
def split_operands(rng, level):
    if level == 1 and V.get("base_l1_all", True):
        a, b = num(rng, 1), num(rng, 1)
    else:
        a, b = rnum(rng, 1 if level == 1 else 2), rnum(rng, 2 if level == 3 else 1)
    return a, b, "+"
def pre_example(rng):
    t = rng.choices(list(PW), weights=list(PW.values()))[0]
    if OUT:
        level = rng.choice((1, 2, 3))
        if t == "lang":
            return lang_out(rng, level, KD, NOUNS[:8])
        if t == "calc":
            a, b, op = operands(rng, level)
            if max(str(a + b)) < str(KD):
                return f"calc:{a}+{b}=", f"{a + b} tr:{a + b}={toy(a + b)}", ""
            return f"calc:{a}+{b}=", f"{a + b} tr:{a + b}=", toy(a + b)
        return sample(t, rng, level)
    if V.get("split") == "lang":
        level = rng.choice((1, 2, 3))
        if t == "lang":
            return lang(rng, level, KD, NOUNS[:8])
        if t == "calc":
            a, b, op = operands(rng, level)
            if max(str(a) + str(b)) < str(KD):
                return f"calc:{toy(a)}+{toy(b)}=", f"{a}+{b}={a + b}"
            return f"calc:{toy(a)}+{toy(b)}={a}+{b}=", f"{a + b}"
        return sample(t, rng, level)
    if not V.get("split"):
        return sample(t, rng)
    level = rng.choice((1, 2, 3))
    if t == "arith":
        a, b, op = split_operands(rng, level); return f"{a}{op}{b}=", str(ev(a, b, op))
    if t == "calc":
        a, b, op = split_operands(rng, level)
        if V.get("calc_known_only", True):
            a, b = rnum(rng, 1 if level == 1 else 2), rnum(rng, 2 if level == 3 else 1)
        return f"calc:{toy(a)}{op}{toy(b)}=", f"{a}{op}{b}={ev(a, b, op)}"
    if t == "lang":
        return lang(rng, level, KD, NOUNS[:8])
    return strings(rng, 1)
def excl(f):
    def s(rng):
        while True:
            x = f(rng)
            if x[0] not in HELD: return x
    return s

out = Path(V["out"]); out.mkdir(parents=True, exist_ok=True)
cfg = dict(B.MODEL_CONFIG); cfg.update(V.get("model", {}))
B.MODEL_CONFIG.clear(); B.MODEL_CONFIG.update(cfg)
t0 = time.time()
if not (out / "base" / "model.safetensors").exists():
    torch.manual_seed(1234)
    model = B.new_model()
    print("params", sum(p.numel() for p in model.parameters()), flush=True)
    B.train(model, excl(pre_example), seed=1234, log_every=500, **V["pre"])
    B._save(model, out / "base")
print("base done", round(time.time() - t0), flush=True)
from transformers import LlamaForCausalLM
def train2(model, sample_pair, steps, batch, lr, warmup, seed, mult):
    enc = B.Encoder(); rng = random.Random(seed)
    groups = {}
    for n, p in model.named_parameters():
        m = next((v for k, v in mult.items() if k in n), mult.get("*", 1.0))
        groups.setdefault(m, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "mult": m} for m, ps in groups.items()], lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups: g["lr"] = B._lr_at(step, steps, lr, warmup) * g["mult"]
        ids, labels, mask = enc.batch([sample_pair(rng) for _ in range(batch)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    model.eval()
FT = V["ft"]; replay = FT.get("replay", 0.2)
for k, skill in enumerate(["arith", "strings", "lang"]):
    if (out / skill / "model.safetensors").exists(): continue
    model = LlamaForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    def mix(rng, skill=skill):
        if rng.random() < replay: return pre_example(rng)
        if skill == "lang" and V.get("lang_calc") and rng.random() < 0.5:
            a, b, op = operands(rng, rng.choice((1, 2, 3)))
            return f"calc:{toy(a)}+{toy(b)}=", f"{a}+{b}=", f"{a + b}"
        if skill == "arith" and V.get("arith_calc") and rng.random() < 0.5:
            a, b, op = operands(rng, rng.choice((1, 2, 3)))
            return f"calc:{toy(a)}+{toy(b)}={a}+{b}=", f"{a + b}", ""
        return sample(skill, rng)
    mult = V.get("mult", {}).get(skill, {})   # param-name substring -> lr multiplier
    train2(model, excl(mix), seed=1235 + k, mult=mult, **{k2: v for k2, v in FT.items() if k2 != "replay"})
    B._save(model, out / skill)
print("experts done", round(time.time() - t0), flush=True)

def sd(name):
    return {k: v.detach().clone() for k, v in LlamaForCausalLM.from_pretrained(str(out / name), dtype=torch.float32).named_parameters()}
S = {n: sd(n) for n in ["base", "arith", "strings", "lang"]}
backend = HFBackend(out / "base", batch_size=150)
def layer_of(name):
    import re
    m = re.search(r"layers\.(\d+)\.", name); return int(m.group(1)) if m else None
def ta(ws, layerwise=None):
    r = {}
    for k, b in S["base"].items():
        d = b.clone()
        for e, w in ws.items():
            if layerwise is not None:
                L = layer_of(k); w = layerwise[e][L] if L is not None else layerwise[e][-1]
            d += w * (S[e][k] - b)
        r[k] = d
    return r
def ties(ws, dens=0.5):
    return {k: M.ties(b, [S[e][k] for e in ws], list(ws.values()), [dens] * len(ws)) for k, b in S["base"].items()}
def score(weights):
    backend.load_weights(weights, backend.config)
    return {t: round(sum(r.score for r in backend.score(task, range(len(task.items)))) / len(task.items), 3) for t, task in TASKS.items()}
res = {}
rows = {"base": S["base"], "arith": S["arith"], "strings": S["strings"], "lang": S["lang"],
        "lin3": {k: sum(S[e][k] for e in ["arith", "strings", "lang"]) / 3 for k in S["base"]},
        "ta3 w1": ta({"arith": 1, "strings": 1, "lang": 1}), "ta3 w.5": ta({"arith": .5, "strings": .5, "lang": .5}),
        "ties3": ties({"arith": 1, "strings": 1, "lang": 1}),
        "ta al w1": ta({"arith": 1, "lang": 1}), "ta al w.7": ta({"arith": .7, "lang": .7}), "ta al w1.3": ta({"arith": 1.3, "lang": 1.3}),
        "ties al": ties({"arith": 1, "lang": 1}),
        }
nl = cfg["num_hidden_layers"]
h = nl // 2
rows["layer lang-low arith-high"] = ta({"arith": 1, "lang": 1}, {"arith": [0] * h + [1] * (nl - h) + [1], "lang": [1] * h + [0] * (nl - h) + [1]})
rows["layer arith-low lang-high"] = ta({"arith": 1, "lang": 1}, {"arith": [1] * h + [0] * (nl - h) + [1], "lang": [0] * h + [1] * (nl - h) + [1]})
for name, w in rows.items():
    res[name] = score(w); print(f"{name:28s} {res[name]}", flush=True)
json.dump({"variant": V, "results": res, "seconds": time.time() - t0}, open(out / "results.json", "w"), indent=1)
