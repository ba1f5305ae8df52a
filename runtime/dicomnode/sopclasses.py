"""What the node accepts: radiography storage SOP classes, Verification, and the transfer syntaxes the
installed pydicom pixel decoders can read.

Storage SOP classes (PS3.4 B.5) accepted by default: Digital X-Ray (for presentation and for
processing), Computed Radiography and single-frame Secondary Capture. Digital mammography is accepted
only when the bundle says its model is for mammograms (``"dicom": {"mammography": true}`` in
``bundle.json``): a hand or chest model has no business judging a mammogram. Every other SOP class
(CT, MR, ultrasound, ...) is refused in association negotiation (its presentation context is rejected
with "abstract syntax not supported"), so its dataset never reaches the node.

Transfer syntaxes: the uncompressed ones always, compressed ones only when pydicom has an available
decoder for them here (pylibjpeg for JPEG / JPEG 2000 / JPEG-LS, pydicom's own RLE decoder). Anything
the node accepts it can therefore decode; a sender whose only proposal is, e.g., JPEG XL gets the
context rejected ("transfer syntaxes not supported") and can fall back or transcode.
"""

from __future__ import annotations

from pydicom import uid

RADIOGRAPHY = {
    uid.DigitalXRayImageStorageForPresentation: "DX for presentation",
    uid.DigitalXRayImageStorageForProcessing: "DX for processing",
    uid.ComputedRadiographyImageStorage: "CR",
    uid.SecondaryCaptureImageStorage: "secondary capture",
}
MAMMOGRAPHY = {
    uid.DigitalMammographyXRayImageStorageForPresentation: "MG for presentation",
    uid.DigitalMammographyXRayImageStorageForProcessing: "MG for processing",
}
UNCOMPRESSED = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
)
COMPRESSED = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)


def storage_sop_classes(manifest: dict) -> dict[str, str]:
    """SOP Class UID → short name of every storage class the node accepts for this bundle."""
    out = dict(RADIOGRAPHY)
    if bool((manifest.get("dicom") or {}).get("mammography", False)):
        out.update(MAMMOGRAPHY)
    return out


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data pydicom can decode with the plugins installed here."""
    from pydicom.pixels import get_decoder

    out = list(UNCOMPRESSED)
    for ts in COMPRESSED:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out
