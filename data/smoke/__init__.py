"""The built-in smoke corpora (`python -m data.smoke OUT`): organic stdlib text and code, verified synthetic maths and
code exercises, chats, preference pairs, PTS questions and eval sets; no downloads."""
