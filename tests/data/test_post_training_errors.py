"""SFT conversations and DPO pairs that used to get through: an empty assistant turn, an empty chosen text, the pad id
or an id past int64 as a token. Each is refused with the file and line; under `python -m train` with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.packing import ChatDataError
from data.pairs import PairBatches, parse_pair
from data.sft import ChatBatches, load_conversations
from data.sources import iter_documents
from data.tokenizer import PAD_ID, VOCAB_SIZE

REPO = Path(__file__).resolve().parents[2]
GOOD_CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
GOOD_PAIR = {"prompt": [{"role": "user", "content": "Is 7 prime?"}], "chosen": "Yes.", "rejected": "No."}


def write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


# --- SFT --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "  \n\t"])
def test_sft_empty_assistant_content_refused(tmp_path, tok, content):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": GOOD_CHAT}, {"messages": [
        {"role": "user", "content": "Say something."}, {"role": "assistant", "content": content}]}])
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:2: no assistant message with non-empty content"):
        ChatBatches(path, seq_len=64, micro_batch=1, global_batch=1, tokenizer=tok)


CHATS_TO_JUDGE = [
    GOOD_CHAT,
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": "c"}],  # one empty turn among real ones: both readers keep it
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "only the model speaks"}],
]


@pytest.mark.parametrize("i", range(len(CHATS_TO_JUDGE)))
def test_sft_and_prepare_accept_the_same_conversations(tmp_path, tok, i):
    """data.prepare's chat kind and the SFT reader apply one rule to the same conversation."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS_TO_JUDGE[i]}])
    skipped = Counter()
    prepare_keeps = bool(list(iter_documents([path], kind="chat", text_field="messages", on_error="skip",
                                              skipped=skipped)))
    try:
        load_conversations(path, tok)
        sft_keeps = True
    except ChatDataError:
        sft_keeps = False
    assert sft_keeps == prepare_keeps, (CHATS_TO_JUDGE[i], skipped)


def test_sft_missing_messages_key_is_named(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversation": GOOD_CHAT}])
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:1: no key 'messages' \(keys present: \['conversation'\]\)"):
        load_conversations(path, tok)


@pytest.mark.slow  # a real trainer process (about 10 s: it stops while reading the data)
def test_sft_data_error_under_python_m_train_exits_2_with_file_and_line(tmp_path):
    """The real trainer CLI: a bad conversation is a configuration error (exit 2, file:line), not a traceback."""
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"messages": GOOD_CHAT}, {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}])
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "configs/smoke/sft.yaml", "data.sft_sources=[]", f"data.sft_path={bad}", "train.init_from=",
         f"output_dir={run_dir}", "logging.wandb.mode=disabled", "train.max_steps=1"],  # accepted: 1 step, not 120
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{bad}:2: no assistant message with non-empty content" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()


# --- DPO --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["chosen", "rejected"])
@pytest.mark.parametrize("text", ["", " \n"])
def test_dpo_empty_completion_text_refused(tmp_path, tok, side, text):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_PAIR, {**GOOD_PAIR, side: text}])
    with pytest.raises(ChatDataError, match=rf"bad\.jsonl:2: '{side}' is empty; expected the text of a completion"):
        PairBatches(path, seq_len=64, micro_batch=1, global_batch=1, tokenizer=tok)


@pytest.mark.parametrize("key", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_dpo_pad_id_as_a_token_refused(tok, key):
    pair = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7]}
    pair[key] = pair[key][:1] + [PAD_ID] + pair[key][1:]
    with pytest.raises(ChatDataError, match=rf"p\.jsonl:5: '{key}'\[1\] = {PAD_ID} is the pad id <\|dummy_85\|>"):
        parse_pair(pair, "p.jsonl:5", tok)


@pytest.mark.parametrize("bad_id", [2 ** 70, -(2 ** 70), VOCAB_SIZE, -1])
def test_dpo_out_of_range_ids_named_not_overflow(tmp_path, tok, bad_id):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]},
        {"prompt_ids": [1, 2], "chosen_ids": [3, bad_id], "rejected_ids": [4]}])
    with pytest.raises(ChatDataError) as e:
        PairBatches(path, seq_len=64, micro_batch=1, global_batch=1, tokenizer=tok)
    assert str(e.value) == (f"{path}:2: 'chosen_ids'[1] = {bad_id} is outside the vocabulary [0, {VOCAB_SIZE})")


def test_dpo_valid_ids_still_accepted(tmp_path, tok):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt_ids": [0, 1], "chosen_ids": [VOCAB_SIZE - 1],
                                                "rejected_ids": [PAD_ID - 1]}, GOOD_PAIR])
    pb = PairBatches(path, seq_len=64, micro_batch=1, global_batch=1, tokenizer=tok)
    assert pb.forms == {"ids": 1, "text": 1} and pb.sequences(0)[1].tolist() == [VOCAB_SIZE - 1]
