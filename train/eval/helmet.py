"""HELMET long-context categories (Phi-4 report Table 6): RAG, Re-rank, ICL, QA and Summ at 8K / 16K, as
princeton-nlp/HELMET builds and scores them (Recall is train/eval/recall.py). Data: train/eval/helmet_data.py.

A length is HELMET's input_max_length, prompt + answer: the prompt is at most length - the generation budget, and when
longer the context (passages, demos-as-context for ICL) loses tokens from its end until it fits, as HELMET's
model_utils.tokenize does (HELMET cuts once by the context's own token count; we repeat the cut until the whole prompt
fits, since a cut can shift the tokens at the seam). Greedy decoding; stop at the first newline where HELMET's config
sets stop_new_line (rag, rerank, icl: the completion is cut there afterwards).

Sources (HELMET, data.py unless said): prompts `load_qa` (rag), `load_msmarco_rerank`, `load_icl`, `load_narrativeqa`,
`load_multi_lexsum`; per-length files and shots scripts/generate_configs.py; prompt = user_template + "\\n" (summ
"\\n\\n") + system_template, the output prefixed with system_template before scoring (eval.py) unless chat; metrics
utils.py (calculate_metrics, parse_output, parse_rankings; nDCG@10 as pytrec_eval's ndcg_cut). Per category:
  rag     2 demos, 20 tokens, SubEM (substring_exact_match)  | rerank  2 demos, 200 tokens, NDCG@10
  icl     shots by length, 20 tokens, exact_match            | qa      NarrativeQA, 2 demos, 100 tokens, chat
  summ    Multi-LexSum, 2 demos, 400 tokens, chat
use_chat_template: HELMET's configs set false for rag / rerank / icl and true for qa / summ (system message None);
`prompt` follows that unless set. QA and Summ are GPT-4o-judged in HELMET and the report; here they are scored with
HELMET's lexical metrics instead (QA: token F1, Summ: ROUGE-Lsum F1), so they carry no paper_score. Also unlike
HELMET: their documents are filtered and cut with our tokenizer (HELMET: Llama-2's) and their demos are drawn with
the seed (HELMET: unseeded). Metrics are fractions in [0, 1]; the paper's scores are percent.
"""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from data.benchmarks import BenchmarkError
from train.eval.helmet_config import DEFAULT_DATASETS, DEFAULT_SAMPLES, LongContextTask
from train.eval.helmet_data import (ICL_DATA, ICL_SHOTS, LONG_DATA, answer_metrics, best_metrics, data_files,
                                    group_labels, hf_permutation, hf_split, icl_item, icl_splits, icl_test_items,
                                    length_slot, ndcg_at, parse_output, parse_rankings, pick_demos, read_jsonl_rows,
                                    select_keys, split_files)
from train.eval.recall import _context_at_least
from train.eval.tasks import generate_texts, shard_indices

RAG_TEMPLATE = ("Use the given documents to write a concise and short answer to the question. Write your answer in "
                "the following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}")
RERANK_TEMPLATE = ("You are provided with a list of documents, each indicated by their ID. Rank each document based on "
                   "their relevance to the question in descending order from most relelvant to least relevant texts. "
                   "Include all documents in the rankings. Write your answer using the unique IDs, with the following "
                   "format:\nRanking: ID3 > ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}")  # sic "relelvant"
ICL_TEMPLATE = ('Use the provided mapping from the text to label to assign a label to the text. Only output "label: '
                '{{label}}" and nothing else. \n\n{context}\n\n{question}')
QA_TEMPLATE = ("You are given a story, which can be either a novel or a movie script, and a question. Answer the "
               "question as concisely as you can, using a single phrase if possible.\n\n{demos}{context}\n\n"
               "Question: {question}")
SUMM_TEMPLATE = ("You are given the legal documents in a civil rights lawsuit, and you are tasked to summarize the "
                 "case. Write a concise summary of one paragraph (200 to 250 words). The summary should contain a "
                 "short description of the background, the parties involved, and the outcomes of the case.\n\n"
                 "{demos}Legal documents:\n{context}\n\nNow please summarize the case.")
# category -> (user template, system template, its separator, generation budget in tokens, stop at newline, chat)
PROMPTS = {"rag": (RAG_TEMPLATE, "Answer:", "\n", 20, True, False),
           "rerank": (RERANK_TEMPLATE, "Ranking:", "\n", 200, True, False),
           "icl": (ICL_TEMPLATE, "label:", "\n", 20, True, False),
           "qa": (QA_TEMPLATE, "Answer:", "\n", 100, False, True),
           "summ": (SUMM_TEMPLATE, "Summary:", "\n\n", 400, False, True)}
PRIMARY = {"rag": "substring_exact_match", "rerank": "ndcg@10", "icl": "exact_match", "qa": "f1",
           "summ": "rougeLsum_f1"}
SHOTS = 2  # rag, rerank, qa, summ (HELMET's configs)
# qa / summ: HELMET keeps documents of at least this many tokens (the same documents at every length) and cuts them to
# length - (prompt allowance + generation), ending with OMITTED
LONG_MIN_TOKENS = {"narrativeqa": 131072, "multi_lexsum": 65536}
LONG_ALLOWANCE = {"narrativeqa": 200 + 100, "multi_lexsum": 300 + 400}
OMITTED = " ... [the rest of the text is omitted]"


def _chat(task: LongContextTask) -> bool:
    return task.prompt == "chat" if task.prompt else PROMPTS[task.category][5]


def build_prompt(tok, category: str, fields: dict, length: int, chat: bool) -> tuple[list[int], int]:
    """(prompt ids of at most length - generation budget, context tokens cut); fields: demos, context, question."""
    user, system, sep, gen, _, _ = PROMPTS[category]
    budget = length - gen

    def render(f: dict) -> list[int]:
        text = user.format(**f)
        if chat:
            return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tok.encode(text + sep + system)

    ids, ctx, cut = render(fields), None, 0
    while len(ids) > budget:
        ctx = tok.encode(fields["context"]) if ctx is None else ctx
        if cut >= len(ctx):
            raise ValueError(f"HELMET {category}: the prompt without its context is {len(ids)} tokens, over the "
                             f"{budget}-token budget of length {length}")
        cut = min(len(ctx), cut + len(ids) - budget)
        ids = render({**fields, "context": tok.decode(ctx[:len(ctx) - cut]).rstrip("\ufffd")})
    return ids, cut


# ---- items ------------------------------------------------------------------------------------------------------
def _passages(ctxs: list[dict], ids: bool = False, title: bool = True) -> str:
    if ids:
        fmt = "[ID: {id}] Document (Title: {title}): {text}" if title else "[ID: {id}] Document: {text}"
    else:
        fmt = "Document (Title: {title}): {text}"
    return "\n\n".join(fmt.format(**c) for c in ctxs)


def rag_items(dataset: str, length: int, root: str, n: int, seed: int) -> list[dict]:
    test, demo = data_files("rag", dataset, length, root)
    rows = read_jsonl_rows(test, ("question", "answers", "ctxs"))
    pool = read_jsonl_rows(demo, ("question", "answers", "ctxs"))
    if dataset == "popqa":  # HELMET's kilt_popqa_3: popularity log10(s_pop) < 3, items and demos
        rows, pool = ([r for r in x if math.log10(r["s_pop"]) < 3] for x in (rows, pool))
    key = "id" if rows and all("id" in r for r in rows) else "question"
    items = []
    for r in select_keys(rows, key, n, seed):
        candidates = [d for d in pool if d[key] != r[key]] if dataset == "popqa" else pool  # popqa: one split
        demos = "".join(f"{_passages(d['ctxs'])}\n\nQuestion: {d['question']}\nAnswer: {d['answers'][0]}\n\n"
                        for d in pick_demos(candidates, key, r[key], SHOTS))
        items.append({"id": str(r[key]), "answers": list(r["answers"]),
                      "fields": {"demos": demos, "context": _passages(r["ctxs"]), "question": r["question"]}})
    return items


def rerank_items(length: int, root: str, n: int, seed: int) -> list[dict]:
    test, demo = data_files("rerank", "msmarco_rerank_psg", length, root)
    rows = select_keys(read_jsonl_rows(test, ("qid", "query", "ctxs")), "qid", n, seed)
    pool = read_jsonl_rows(demo, ("qid", "query", "ctxs"))
    if len(pool) > 2 * len(rows):  # HELMET drops every selected query from the demos at once, else per item
        chosen = {r["qid"] for r in rows}
        pool = [d for d in pool if d["qid"] not in chosen]
    items = []
    for r in rows:
        title = bool(r["ctxs"]) and "title" in r["ctxs"][0]
        ctxs = [{**c, "id": str(c["id"])} for c in r["ctxs"]]
        demos = ""
        for d in pick_demos([d for d in pool if d["qid"] != r["qid"]], "qid", r["qid"], SHOTS):
            dc = [{**c, "id": str(c["id"])} for c in d["ctxs"]]
            ranking = " > ".join(c["id"] for c in sorted(dc, key=lambda c: c["label"], reverse=True))
            demos += f"{_passages(dc, True, title)}\n\nQuery: {d['query']}\nRanking: {ranking}\n\n"
        items.append({"id": str(r["qid"]), "qrels": {c["id"]: int(c["label"]) for c in ctxs},
                      "fields": {"demos": demos, "context": _passages(ctxs, True, title), "question": r["query"]}})
    return items


def long_items(tok, dataset: str, length: int, root: str, n: int, seed: int, cache: dict | None = None) -> list[dict]:
    """NarrativeQA (qa) / Multi-LexSum (summ) items, documents cut to length - HELMET's allowance, with 2 demos.
    `cache`: the splits and document tokens, kept between the lengths of one task."""
    name, config, split, cols = LONG_DATA[dataset]
    cache = {} if cache is None else cache
    if dataset not in cache:
        cache[dataset] = (hf_split(Path(root) / name, config, split, cols),
                          hf_split(Path(root) / name, config, "train", cols), {})
    rows, train, doc_ids = cache[dataset]
    rng = random.Random(seed)
    if dataset == "narrativeqa":  # HELMET: test.shuffle(seed), then the length filter, then the first n
        rows = [rows[i] for i in hf_permutation(len(rows), seed)]
        get = lambda r: (r["document"]["text"], r["question"]["text"], [a["text"] for a in r["answers"]])  # noqa: E731
    else:
        rows, train = ([r for r in x if r["summary/short"] is not None] for x in (rows, train))
        get = lambda r: ("\n\n".join(r["sources"]), "", [r["summary/short"]])  # noqa: E731
    keep, limit, least = [], length - LONG_ALLOWANCE[dataset], LONG_MIN_TOKENS[dataset]
    for r in rows:
        context, question, answers = get(r)
        if len(context.encode("utf-8")) < least:  # a token is at least one byte
            continue
        key = hashlib.sha256(context.encode("utf-8")).hexdigest()
        ids = doc_ids[key] = doc_ids[key] if key in doc_ids else tok.encode(context)
        if len(ids) >= least:
            cut = tok.decode(ids[:limit - len(tok.encode(OMITTED))]) + OMITTED if len(ids) > limit else context
            keep.append((r, cut, question, answers))
    if dataset == "multi_lexsum" and len(keep) > n:  # HELMET: the filter, then shuffle(seed) and the first n
        keep = [keep[i] for i in hf_permutation(len(keep), seed)]
    items = []
    for k, (r, context, question, answers) in enumerate(keep[:n]):
        shots = [get(train[i]) for i in rng.sample(range(len(train)), min(SHOTS, len(train)))]
        if dataset == "narrativeqa":
            demos = ("For example:\n\n" + "\n\n".join(f"Question: {q}\nAnswer: {a[0]}" for _, q, a in shots) +
                     "\n\nNow, use the following story to answer the question:\n\n")
        else:
            demos = ("Example summaries:\n\n" + "\n\n".join(f"Summary: {a[0]}" for _, _, a in shots) +
                     "\n\nNow, write a summary of the following legal documents.\n")
        items.append({"id": str(r.get("id", k)), "answers": answers,
                      "fields": {"demos": demos, "context": context, "question": question}})
    return items


def task_items(tok, task: LongContextTask) -> list[tuple[int, str, dict]]:
    """Every (length, dataset, item) of the task in its fixed order (length-major); the position is the index."""
    n = task.samples or DEFAULT_SAMPLES[task.category]
    out, icl_cache, long_cache = [], {}, {}
    for length in task.lengths:
        for dataset in task.datasets or DEFAULT_DATASETS[task.category]:
            if task.category == "rag":
                items = rag_items(dataset, length, task.path, n, task.seed)
            elif task.category == "rerank":
                items = rerank_items(length, task.path, n, task.seed)
            elif task.category == "icl":
                if dataset not in icl_cache:
                    train, test = icl_splits(dataset, task.path, task.seed)
                    label = ICL_DATA[dataset][5]
                    icl_cache[dataset] = (group_labels(train, label), icl_test_items(test, label, n, task.seed))
                groups, rows = icl_cache[dataset]
                shots = ICL_SHOTS[dataset][length_slot(length)]
                items = [{"id": str(j), **icl_item(r, groups, dataset, shots, task.seed)} for j, r in enumerate(rows)]
                for it in items:
                    it["fields"] = {"context": it.pop("context"), "question": it.pop("question")}
            else:
                items = long_items(tok, dataset, length, task.path, n, task.seed, long_cache)
            out += [(length, dataset, it) for it in items]
    return out


# ---- running and scoring ----------------------------------------------------------------------------------------
def score_output(category: str, output: str, item: dict) -> dict:
    """The item's HELMET metrics from the output (system prefix included for plain prompts)."""
    if category == "rerank":
        ranking = parse_rankings(output)
        return {"ndcg@10": ndcg_at(ranking, item["qrels"], 10), "num_preds": len(ranking)}
    prefix = PROMPTS[category][1]
    if category == "icl":  # HELMET scores the parsed label only
        return answer_metrics(parse_output(output, prefix), item["answers"])
    return best_metrics(output, item["answers"], prefix, rouge=category in ("qa", "summ"))


def eval_long_context(model, tok, task: LongContextTask, cfg, device, shard: tuple[int, int] = (0, 1)) -> dict:
    """Items n % N == I of the task (all lengths and datasets), generated greedily and scored; lengths beyond the
    model's context are skipped (recorded) unless allow_beyond_context."""
    _, system, _, gen, stop_newline, _ = PROMPTS[task.category]
    chat, context = _chat(task), model.cfg.max_seq_len
    entries = task_items(tok, task)
    mine = set(shard_indices(len(entries), shard))
    skipped, samples = {}, []
    for length in task.lengths:
        if length > context and not task.allow_beyond_context:
            skipped[f"len_{length}"] = f"beyond the model's max_seq_len={context}"
            continue
        rows = [(i, e) for i, e in enumerate(entries) if i in mine and e[0] == length]
        built = [build_prompt(tok, task.category, e[2]["fields"], length, chat) for _, e in rows]
        if not rows:
            continue
        with _context_at_least(model, length):
            texts = generate_texts(model, tok, [ids for ids, _ in built], gen, 0.0, 1.0, cfg, device)
        for (i, (_, dataset, item)), (ids, cut), text in zip(rows, built, texts):
            if stop_newline:
                text = text.split("\n")[0]
            output = text if chat else system + text
            samples.append({"index": i, "dataset": dataset, "length": length, "id": item["id"],
                            "prompt_tokens": len(ids), "context_tokens_cut": cut, "completion": text,
                            **({"answers": item["answers"]} if "answers" in item else {}),
                            **score_output(task.category, output, item)})
    record = {"task": task.name, "kind": "long_context", "metrics": long_context_metrics(task, samples),
              "skipped": skipped, "samples": samples}
    if task.paper_score is not None:
        record["paper_score"] = {f"score/{int(k)}": v for k, v in task.paper_score.items()}
    return record


def long_context_metrics(task: LongContextTask, samples: list[dict]) -> dict:
    """<dataset>/len_<L>/<metric> means and score/<L> (the category score: the mean over datasets of each one's HELMET
    metric, a fraction; the paper's are percent), from the samples alone."""
    primary = PRIMARY[task.category]
    groups: dict[tuple[int, str], list[dict]] = {}
    for s in sorted(samples, key=lambda s: s["index"]):
        groups.setdefault((s["length"], s["dataset"]), []).append(s)
    metrics, per_length = {}, {}
    skip = {"index", "dataset", "length", "id", "prompt_tokens", "context_tokens_cut", "completion", "answers"}
    for (length, dataset), rows in groups.items():
        for k in [k for k in rows[0] if k not in skip]:
            metrics[f"{dataset}/len_{length}/{k}"] = sum(float(r[k]) for r in rows) / len(rows)
        metrics[f"{dataset}/len_{length}/items"] = len(rows)
        per_length.setdefault(length, []).append(metrics[f"{dataset}/len_{length}/{primary}"])
    for length, values in per_length.items():
        metrics[f"score/{length}"] = sum(values) / len(values)
    return metrics


def check_long_context_inputs(task: LongContextTask, key: str) -> None:
    """BenchmarkError naming the missing file (and HELMET's layout) before a model is loaded."""
    for dataset in task.datasets or DEFAULT_DATASETS[task.category]:
        if task.category in ("rag", "rerank"):
            for length in task.lengths:
                for f in data_files(task.category, dataset, length, task.path):
                    if not f.is_file():
                        raise BenchmarkError(f"{key}: {f} does not exist; expected HELMET's data (scripts/"
                                             f"download_data.sh unpacks data.tar.gz of huggingface.co/datasets/"
                                             f"princeton-nlp/HELMET: {task.path}/kilt/, {task.path}/msmarco/)")
        elif task.category == "icl":
            name, config, test, train, text, label, _ = ICL_DATA[dataset]
            for split in [x for x in (train, test) if x]:
                _check_split(key, Path(task.path) / name, config, split, (text, label))
        else:
            name, config, split, cols = LONG_DATA[dataset]
            for s in (split, "train"):
                _check_split(key, Path(task.path) / name, config, s, cols)


def _check_split(key: str, directory: Path, config: str, split: str, cols: tuple[str, ...]) -> None:
    if not directory.is_dir():
        raise BenchmarkError(f"{key}: {directory} does not exist; expected a Hugging Face dataset directory with "
                             f"{split}-*.parquet or {split}.jsonl (columns {list(cols)}), see "
                             f"train/eval/helmet_data.py")
    split_files(directory, config, split, cols)
