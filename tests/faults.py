"""Run train.py in this process and stop it at a chosen point, for the kill-and-resume tests.

    python tests/faults.py train_step:7:SIGKILL --dataset=... --epochs=4    # killed at the 7th step
    python tests/faults.py os.replace:3:SIGINT --resume=runs/x                 # Ctrl-C before the 3rd rename
    python tests/faults.py count:train_step,os.replace --dataset=...           # no fault: print the counts

A point is the n-th call of a Python function by name (train_step, evaluate_step, finish,
run_pictures, ...) or of a module's builtin (os.replace: every atomic rename, checkpoints included; os.unlink).
The signal is sent to this process at that call: SIGKILL ends it on the spot, as kill -9 or a
machine's out-of-memory killer would; SIGINT raises KeyboardInterrupt, as Ctrl-C does. train.py's
imports happen before the profile hook is set, so only the run itself is slowed.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv):
    point, args = argv[0], argv[1:]
    import train  # its imports, then the hook

    counts = {}
    if point.startswith("count:"):
        watched, target = set(point[len("count:"):].split(",")), None
    else:
        name, nth, sig = point.split(":")
        watched, target = {name}, (name, int(nth), getattr(signal, sig))

    def profile(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_name
        elif event == "c_call" and type(getattr(arg, "__self__", None)) is type(os):  # a module's builtin
            name = "os." + arg.__name__ if arg.__self__.__name__ in ("posix", "nt") else arg.__name__
        else:
            return
        if name in watched:
            counts[name] = counts.get(name, 0) + 1
            if target and name == target[0] and counts[name] == target[1]:
                sys.setprofile(None)
                os.kill(os.getpid(), target[2])

    # A process started in the background by a non-interactive shell (nohup, `&` in a script: how
    # CI may start the tests) inherits SIGINT ignored, and Python then keeps it ignored: a SIGINT
    # point would not stop the run. Ctrl-C's own handler, whatever the parent did.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.setprofile(profile)
    try:
        status = train.main(args)
    finally:
        sys.setprofile(None)
    if target is None:
        print("COUNTS " + json.dumps(counts))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
