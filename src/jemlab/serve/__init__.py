"""``jemlab serve``: a local web page that shows a trained energy model at work.

Draw an image and see p(y|x), the energy E(x) and an out-of-distribution verdict; refine the drawing with the
model's sampler and watch it move; watch chains go from noise to samples. ``actions`` holds the model-specific
part (one function per action), ``app`` the request logic, ``server`` the HTTP layer, ``static`` the page.
"""

from jemlab.serve.actions import ACTION_FACTORIES, ModelActions, Prediction, build_actions, jem_actions
from jemlab.serve.app import DemoApp, Limits, Reference, RequestError
from jemlab.serve.server import DemoServer, create_app, make_server

__all__ = [
    "ACTION_FACTORIES",
    "DemoApp",
    "DemoServer",
    "Limits",
    "ModelActions",
    "Prediction",
    "Reference",
    "RequestError",
    "build_actions",
    "create_app",
    "jem_actions",
    "make_server",
]
