"""``python -m diffexp.train`` as a submitit job (for the test that submitit's local executor requeues
an interrupted run and the requeued job finishes it): a Checkpointable, so submitit requeues it with
the same arguments when the job gets its preemption signal."""

import sys

import submitit


class Train(submitit.helpers.Checkpointable):
    def __call__(self, *overrides: str) -> str:
        from diffexp.train import main

        sys.argv = ["diffexp.train", *overrides]
        try:
            main()
        except SystemExit as e:
            if e.code:  # a requeue (submitit's own exit status) or an error: the job's end as it was
                raise
        return "finished"
