"""Editable installs (`pip install -e .`) need the start-up hook too: hatchling's force-include only
applies to regular wheels, so this build hook adds the hook module and its .pth to editable wheels."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class StartupHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "editable":
            build_data["force_include_editable"]["_lm_sparse_hook.py"] = "_lm_sparse_hook.py"
            build_data["force_include_editable"]["lm_sparse.pth"] = "lm_sparse.pth"
