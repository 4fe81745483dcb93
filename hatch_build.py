"""Wheel build hook: the top-level params/ and notebooks/ travel inside the package of a wheel, as
instructblip_peft/params and instructblip_peft/notebooks (config.py's installed copy). An editable install
gets no copies: the package then reads the clone's own folders, so an edit there is never shadowed."""
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIPPED = {"params": "instructblip_peft/params", "notebooks": "instructblip_peft/notebooks"}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(SHIPPED)
