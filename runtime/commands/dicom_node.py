"""`gamguard dicom-node`: a DICOM Storage/Verification SCP that answers X-ray consoles with guarded results."""

HELP = "DICOM node: receive X-rays by C-STORE, verify them, send SR verdicts and heatmap overlays to the PACS"

DESCRIPTION = """\
A DICOM Storage and Verification SCP in front of the guard. An X-ray console sends its images here by
C-STORE (as it would to a PACS); each image is verified by the same bundle, guard and micro-batching
data plane as `gamguard serve`, and the node sends the results to the destinations (--forward, e.g.
the PACS), in the image's own patient and study, as two new series:

  SR (series 9901)              Comprehensive SR, TID 1500: accepted/rejected, reasons, every check's
                                score and p-value, the label and probabilities only when accepted,
                                model name/version and bundle SHA-256, the source image's SOP Instance UID
  Secondary Capture (9902)      the Grad-CAM heatmap overlay, burned-in captions, not for diagnosis

Accepted: Digital X-Ray (for presentation/processing), CR and secondary capture images (mammography only
if the bundle says so) in any transfer syntax pydicom can decode here; every other SOP class is refused
at association. An image is acknowledged (status 0x0000) only once it is safely on disk (fsync) in
--queue-dir; undecodable images get 0xC000 with the reason, a busy node 0xA700 (retry).

Store-and-forward: results wait in --queue-dir/outbox until each destination has stored them; a
destination that is down or refuses is retried with backoff (--retry-initial-s .. --retry-max-s), across
restarts. Result UIDs derive from the image's SOP Instance UID and the bundle hash, so resending an
image never duplicates results at the archive.

Access: only calling AE titles given with --allow-ae (AET or AET@HOST) may associate, and only to this
node's --ae-title; --max-associations / --max-pdu / --timeout-s limit what a peer can hold; DICOM TLS
with --tls-cert/--tls-key (+ --tls-client-ca for client certificates).

Options can also come from the serve config file (--config): the shared keys at top level, the node's
in a 'dicom:' section. Metrics (--metrics-port) and the audit log (--audit-log) cover the DICOM path;
neither ever contains patient data.

Examples:
  gamguard dicom-node --ae-title GAMGUARD --port 11112 --allow-ae DX_ROOM1 --forward PACS@10.0.0.5:104
  gamguard dicom-node --bundle /opt/bundle --port 11112 --ae-title GAMGUARD --allow-ae DX_ROOM1@10.0.0.21 \\
                      --forward PACS@pacs.local:104 --queue-dir /var/lib/gamguard/dicom --metrics-port 9090
  gamguard dicom-node --config /etc/gamguard/gamguard.yaml --grpc-port 8001    # DICOM and gRPC, one process
"""


def add_arguments(parser):
    from gamguard.runtime.dicomnode.config import add_dicom_node_arguments

    add_dicom_node_arguments(parser)


def run(args):
    import asyncio
    import logging

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.commands.signals import stop_event_on_signals
    from gamguard.runtime.dicomnode.config import node_config_from_args
    from gamguard.runtime.server.config import ConfigError

    try:
        config, serve_config = node_config_from_args(args)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    from gamguard.runtime.dicomnode.node import DicomNode

    log = logging.getLogger("gamguard.dicom_node")

    async def main() -> int:
        node = DicomNode(config, serve_config)
        try:
            await node.start()
        except (OSError, RuntimeError, ValueError) as exc:
            await node.stop(grace_s=0)
            raise CommandError(f"cannot start the DICOM node: {exc}") from None
        stop = stop_event_on_signals(node.audit)
        print(
            f"gamguard: DICOM node {config.ae_title} on {config.host}:{node.port}"
            + (f", gRPC on :{node.grpc_server.port}" if node.grpc_server else "")
            + (
                f", metrics on {serve_config.metrics_bind_host}:{node.metrics_port}/metrics"
                if node.metrics_port
                else ""
            ),
            flush=True,
        )
        await stop.wait()
        log.info("signal received: finishing open associations, then stopping")
        await node.stop()
        return 0

    return asyncio.run(main())
