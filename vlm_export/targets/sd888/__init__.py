"""Snapdragon 888 target (QNN HTP context binaries + XNNPACK/CPU models); see target.py."""

from vlm_export.targets.sd888.target import Profile, build, cli_help, preflight

__all__ = ["Profile", "build", "cli_help", "preflight"]
