"""The error type the CLI turns into a one-line message, and the exit codes of every command.

=====  ===========================================================================================
code   meaning
=====  ===========================================================================================
0      finished: everything asked for was done
1      failed: a run-all job failed, or the system refused (OSError: a read-only or full folder)
2      usage: a mistyped command or option, a bad value, or a `UserError` (bad input, with the fix)
3      partial: finished, but short of what was asked (`generate` kept fewer than ``--num`` pairs;
       `run-all` left defect types unscored because their generation kept none, or fell short)
130    interrupted (Ctrl-C); finished work is kept and a re-run resumes from it
141    the reader of the output went away (``dualanodiff info X | head -1``); nothing more is printed
143    SIGTERM: the process ends by the signal itself, after saving as on Ctrl-C
=====  ===========================================================================================
"""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as `yes | head -1` ends


class UserError(Exception):
    """Bad input from the user: the message names the file or option and says what to do."""


class OtherSettings(UserError):
    """An output folder holds results made with other settings (`generate` refuses to mix them; `run-all`,
    whose re-runs redo a job whose settings changed, replaces them)."""


def describe_changes(saved: dict, wanted: dict) -> str:
    """What an `OtherSettings` message names: ``steps 2 -> 3; rank 4 -> 8`` for each of ``wanted``'s keys whose
    value ``saved`` does not hold ("" when none)."""
    return "; ".join(f"{key} {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value)
