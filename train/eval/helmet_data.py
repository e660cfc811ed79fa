"""HELMET's data for the long-context categories: the files per length, the item selection, the demos and the
metrics, each following princeton-nlp/HELMET (data.py, utils.py, scripts/generate_configs.py; see train/eval/helmet.py
for the prompts). Random choices use HELMET's generators: Python's `random` where HELMET does, and numpy's
default_rng(seed).permutation where HELMET calls Hugging Face `Dataset.shuffle` / `train_test_split` (what they do),
so the same items, demos and label maps are drawn.

Files (`path` of the task):
  rag     PATH/kilt/{nq,triviaqa}-dev-multikilt_1000_k{K}_dep6.jsonl, hotpotqa-dev-multikilt_1000_k{K}_dep3.jsonl,
          popqa_test_1000_k{K}_dep6.jsonl; demos *-train-multikilt_1000_k3_dep*.jsonl, popqa_test_1000_k3_dep6.jsonl
          rows {question, answers: [...], ctxs: [{title, text, has_answer}]} (id optional)
  rerank  PATH/msmarco/test_reranking_data_k{K}_dep3.jsonl, demos test_reranking_data_k10_dep3.jsonl
          rows {qid, query, ctxs: [{id, title?, text, label}]}
  icl     PATH/trec (CogComp/trec: text, coarse_label, fine_label; train / test), PATH/banking77 (PolyAI/banking77:
          text, label), PATH/clinc_oos (config plus: text, intent; train / validation), PATH/nlu_evaluation_data
          (text, label; train only, split 0.1 by seed as HELMET does)
  qa      PATH/narrativeqa (deepmind/narrativeqa: document {text}, question {text}, answers [{text}]; test, train)
  summ    PATH/multi_lexsum (allenai/multi_lexsum v20230518: sources [...], summary/short; validation, train)
Each HF directory holds a split as <split>-*.parquet, <split>.parquet or <split>.jsonl, directly or under data/,
<config>/ or <config>/<split>/ (the parquet conversion). K per length: generate_configs.py's tables below; a length
below HELMET's 4K reads the 4K file (the tests' small lengths), so the prompt is cut to fit as at any length.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np

from data.benchmarks import BenchmarkError, read_rows

HELMET_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
RAG_K = (20, 50, 105, 220, 440, 1000)
RERANK_K = (14, 50, 130, 285, 600, 1000)
ICL_SHOTS = {"trec_coarse": (200, 400, 800, 1600, 3300, 6600), "trec_fine": (200, 400, 800, 1600, 3200, 6400),
             "banking77": (180, 360, 720, 1450, 2900, 5900), "clinic150": (220, 440, 880, 1750, 3525, 7050),
             "nlu": (250, 510, 1020, 2040, 4080, 8296)}
RAG_DEP = {"nq": 6, "triviaqa": 6, "hotpotqa": 3, "popqa": 6}
# dataset -> (HF directory, config, test split, train split, text column, label column, number of labels)
ICL_DATA = {"trec_coarse": ("trec", "default", "test", "train", "text", "coarse_label", 6),
            "trec_fine": ("trec", "default", "test", "train", "text", "fine_label", 50),
            "banking77": ("banking77", "default", "test", "train", "text", "label", 77),
            "clinic150": ("clinc_oos", "plus", "validation", "train", "text", "intent", 151),
            "nlu": ("nlu_evaluation_data", "default", "", "train", "text", "label", 68)}
LONG_DATA = {"narrativeqa": ("narrativeqa", "default", "test", ("document", "question", "answers")),
             "multi_lexsum": ("multi_lexsum", "v20230518", "validation", ("sources", "summary/short"))}


def length_slot(n: int) -> int:
    """HELMET's length slot of a total length: the smallest of HELMET_LENGTHS >= n."""
    return next(i for i, L in enumerate(HELMET_LENGTHS) if L >= n)


def check_dataset_length(category: str, n: int) -> str:
    """'' if HELMET has data for a total length of n tokens, else why not."""
    if n <= 0:
        return "must be > 0"
    if n > HELMET_LENGTHS[-1] and category in ("rag", "rerank", "icl"):
        return f"HELMET publishes {category} data up to {HELMET_LENGTHS[-1]} tokens"
    return ""


def data_files(category: str, dataset: str, length: int, root: str) -> tuple[Path, Path | None]:
    """(test file, demo file) of a rag / rerank dataset at a total length, as HELMET names them."""
    slot = length_slot(length)
    if category == "rerank":
        d = Path(root) / "msmarco"
        return d / f"test_reranking_data_k{RERANK_K[slot]}_dep3.jsonl", d / "test_reranking_data_k10_dep3.jsonl"
    d, k, dep = Path(root) / "kilt", RAG_K[slot], RAG_DEP[dataset]
    if dataset == "popqa":
        return d / f"popqa_test_1000_k{k}_dep6.jsonl", d / "popqa_test_1000_k3_dep6.jsonl"
    return (d / f"{dataset}-dev-multikilt_1000_k{k}_dep{dep}.jsonl",
            d / f"{dataset}-train-multikilt_1000_k3_dep{dep}.jsonl")


def read_jsonl_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise BenchmarkError(f"{path} does not exist; HELMET's file of that name (scripts/download_data.sh unpacks "
                             f"data.tar.gz from huggingface.co/datasets/princeton-nlp/HELMET) with rows "
                             f"{list(required)}")
    rows = read_rows(path)
    for n, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise BenchmarkError(f"{path}: row {n} lacks {missing}; expected HELMET's rows with {list(required)}")
    return rows


def split_files(directory: Path, config: str, split: str, columns: tuple[str, ...]) -> list[Path]:
    """The files of one split of a Hugging Face dataset directory (layouts in the module docstring)."""
    places = [directory, directory / "data", directory / config, directory / config / split]
    files = []
    for d in places:
        files = (sorted(d.glob(f"{split}-*.parquet")) or sorted(d.glob(f"{split}.parquet")) or
                 sorted(d.glob(f"{split}.jsonl")) or (sorted(d.glob("*.parquet")) if d.name == split else []))
        if files:
            break
    if not files:
        raise BenchmarkError(f"{directory}: no file for split {split!r}; expected {directory}/{split}-*.parquet, "
                             f"{directory}/{split}.jsonl (or under data/, {config}/ or {config}/{split}/) with "
                             f"columns {list(columns)}")
    return files


def hf_split(directory: Path, config: str, split: str, columns: tuple[str, ...]) -> list[dict]:
    """The rows of one split of a Hugging Face dataset directory, checked for `columns`."""
    rows = [r for f in split_files(directory, config, split, columns) for r in read_rows(f)]
    for n, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise BenchmarkError(f"{directory} ({split}): row {n} lacks {missing}; expected columns {list(columns)}")
    return rows


def hf_permutation(n: int, seed: int) -> list[int]:
    """Hugging Face Dataset.shuffle(seed=seed)'s order."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def text_seed(text: str) -> int:
    """HELMET's per-item seed: sha256 of the text, mod 2^31."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2**31


def select_keys(rows: list[dict], key: str, n: int, seed: int) -> list[dict]:
    """HELMET's max_test_samples for rag / rerank: random.sample of the sorted unique keys (after random.seed(seed)),
    then the rows with those keys, in file order."""
    keys = sorted({r[key] for r in rows})
    chosen = set(random.Random(seed).sample(keys, min(n, len(keys))))
    return [r for r in rows if r[key] in chosen]


def pick_demos(pool: list[dict], key: str, value, shots: int) -> list[dict]:
    """HELMET's demos: the pool shuffled by the item's sha256 seed, duplicates of `key` dropped, the first `shots`."""
    seen, out = set(), []
    for i in hf_permutation(len(pool), text_seed(str(value))):
        if pool[i][key] not in seen:
            seen.add(pool[i][key])
            out.append(pool[i])
    return out[:shots]


def balance_labels(groups: dict, shots: int, seed: int) -> list[dict]:
    """HELMET's balance_labels: `groups` label -> rows (in first-appearance order); ceil(shots / labels) rounds with
    one row of every label each, shuffled within the round, the first `shots` kept."""
    rand = random.Random(seed)
    rounds = math.ceil(shots / len(groups))
    new = [[] for _ in range(rounds)]
    for rows in groups.values():
        idx = rand.sample(range(len(rows)), rounds % len(rows))  # HELMET's `%`: then topped up below
        while len(idx) < rounds:
            idx += rand.sample(range(len(rows)), min(rounds - len(idx), len(rows)))
        for i, j in enumerate(idx):
            new[i].append(rows[j])
    for r in new:
        rand.shuffle(r)
    return [x for r in new for x in r][:shots]


def group_labels(rows: list[dict], label: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[label], []).append(r)
    return groups


def icl_splits(dataset: str, root: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of an ICL dataset; nlu: HELMET's train_test_split(test_size=0.1, seed)."""
    name, config, test, train, text, label, _ = ICL_DATA[dataset]
    if dataset == "nlu":
        rows = hf_split(Path(root) / name, config, train, (text, label))
        perm = hf_permutation(len(rows), seed)
        n_test = math.ceil(0.1 * len(rows))
        return [rows[i] for i in perm[n_test:]], [rows[i] for i in perm[:n_test]]
    return (hf_split(Path(root) / name, config, train, (text, label)),
            hf_split(Path(root) / name, config, test, (text, label)))


def icl_test_items(test_rows: list[dict], label: str, n: int, seed: int) -> list[dict]:
    """HELMET's test selection: when more than n rows, shuffled by seed and then label-balanced to n."""
    if len(test_rows) <= n:
        return test_rows
    shuffled = [test_rows[i] for i in hf_permutation(len(test_rows), seed)]
    return balance_labels(group_labels(shuffled, label), n, seed)


def icl_item(row: dict, groups: dict, dataset: str, shots: int, seed: int) -> dict:
    """One ICL item: balanced demos and a random relabelling 0..L-1 (both from the text's seed), as HELMET does."""
    _, _, _, _, text, label, num_labels = ICL_DATA[dataset]
    local_seed = (int(hashlib.sha256(row[text].encode("utf-8")).hexdigest(), 16) + seed) % 2**31
    demos = balance_labels(groups, shots, local_seed)
    mapping = list(range(num_labels))
    random.Random(local_seed).shuffle(mapping)
    context = "\n\n".join(f"{d[text]}\nlabel: {mapping[int(d[label])]}" for d in demos)
    return {"context": context, "question": row[text], "answers": [str(mapping[int(row[label])])]}


# ---- metrics (HELMET utils.py) ----------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD / DrQA normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def token_f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction), normalize_answer(truth)
    if (p in ("yes", "no", "noanswer") or t in ("yes", "no", "noanswer")) and p != t:
        return 0.0
    common = sum((Counter(p.split()) & Counter(t.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p.split()), common / len(t.split())
    return 2 * precision * recall / (precision + recall)


def answer_metrics(prediction: str, answers: list[str], rouge: bool = False) -> dict:
    """HELMET's calculate_metrics, the max over answers: exact_match, substring_exact_match (SubEM), f1; rouge:
    rougeL_f1 and rougeLsum_f1 (rouge_score with the stemmer, as HELMET)."""
    out = {"exact_match": float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers)),
           "substring_exact_match": float(any(normalize_answer(a) in normalize_answer(prediction) for a in answers)),
           "f1": max(token_f1(prediction, a) for a in answers)}
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
        scores = [scorer.score(target=a, prediction=prediction) for a in answers]
        out |= {f"{k}_f1": max(s[k].fmeasure for s in scores) for k in ("rougeL", "rougeLsum")}
    return out


def parse_output(output: str, prefix: str = "Answer:") -> str:
    """HELMET's parse_output: the rest of the line after the prefix, else the first line."""
    for pat in (re.compile(f"(?:{prefix})(.*)(?:\n|$)", flags=re.IGNORECASE), re.compile(r"(?:^)(.*)(?:\n|$)")):
        m = pat.search(output)
        if m is not None:
            return re.sub(f"^{re.escape(prefix)}", "", m[1].strip(), flags=re.IGNORECASE).strip()
    return ""


def best_metrics(output: str, answers: list[str], prefix: str, rouge: bool = False) -> dict:
    """HELMET's default_post_process: the metrics of the output and of its parsed answer, the max of each."""
    a, b = answer_metrics(output, answers, rouge), answer_metrics(parse_output(output, prefix), answers, rouge)
    return {k: max(a[k], b[k]) for k in a}


def parse_rankings(output: str) -> list[str]:
    """HELMET's parse_rankings: brackets, ':' and 'id' removed, the longest 'N > N > ...' run, ids deduplicated."""
    output = re.sub(r"[\[\]:]", "", output).lower().replace("id", "")
    longest = max((m.group(0) for m in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", output)), key=len, default="")
    ranks = [x.strip() for x in longest.split(">") if x.strip().isdigit()] if longest else [output]
    return list(dict.fromkeys(ranks))


def ndcg_at(ranking: list[str], qrels: dict[str, int], k: int = 10) -> float:
    """trec_eval's ndcg_cut.k (HELMET scores with pytrec_eval): linear gain = the label, discount log2(rank + 1),
    ideal = the judged labels sorted; documents not judged have gain 0."""
    dcg = sum(qrels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0
