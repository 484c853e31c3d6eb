"""``marlgrc dashboard``: one local web page fed live from the topics.

Three parts, in the manner of TensorBoard: ``state.py`` folds the events read from Kafka into what
the page shows (pure, no I/O); ``feed.py`` tails every topic with ``eventlog.kafka.OffsetReader``
and has the one verifier (``eventlog.audit.verify_kafka``) check the topics again whenever they
moved; ``app.py`` serves the page, its JavaScript (``static/``, shipped in the package, so it works
offline) and the JSON it draws, pushed by server-sent events. The browser never talks to Kafka, and
nothing here writes to Kafka or the ledger.
"""
