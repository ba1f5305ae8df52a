"""``gamguard dicom-node``: X-ray consoles send images by C-STORE, the archive receives guarded results.

The request path (docs/dicom-node.md has the settings, the SR template and the operations)::

    console --C-STORE--> scp in a receiver process (allow-list, SOP class check)
                           --> DataPlane.verify in the node's process (shared micro-batches)
            <-- 0x0000 once journaled --  journal (the image durable, written while verifying; its verdict)
                                             |  results builder (between associations; worker processes)
                                             v
                      results: SR (TID 1500) + Secondary Capture overlay, deterministic UIDs
                                             |
                                          outbox/<destination>/  --forwarder (retries, backoff)--> PACS

Modules: :mod:`.sopclasses` (what is accepted), :mod:`.access` (calling AE allow-list), :mod:`.receiver`
(the processes that run the associations, ``--receivers``), :mod:`.scp` (the pynetdicom handlers;
:mod:`.pdulimit` holds peers to ``--max-pdu`` and reads PDUs whole,
:mod:`.wakeup` wakes its associations on events instead of 1 ms polls, :mod:`.peerlog` keeps their
normal closes out of the error log, :mod:`.filemeta` writes a received dataset's file meta from a
template), :mod:`.journal` and :mod:`.outbox` (on-disk queues, :mod:`.durable` for crash-safe
writes), :mod:`.results` (highdicom SR/SC builders, run in worker processes by :mod:`.resultpool`),
:mod:`.forwarder`, :mod:`.metrics`, :mod:`.config`, :mod:`.node` (assembly), :mod:`.archive` (a small
receiving SCP for the demo and bench).
"""
