"""Training: the jitted train step (:mod:`.step`), the loop (:mod:`.loop`) and its fault
handling (:mod:`.faults`), checkpoints (:mod:`.checkpoint`) and local multi-process jobs
(:mod:`.launch`)."""
