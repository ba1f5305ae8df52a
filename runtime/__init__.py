"""gamguard runtime: decoding, engines, guard, gRPC serving and CLI. Never imports torch."""


def package_version() -> str:
    """The installed gamguard version ("unknown" when running from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gamguard")
    except PackageNotFoundError:
        return "unknown"
