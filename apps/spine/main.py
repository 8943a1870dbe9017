"""MONAI Label app for lumbar spine MRI. Thin on purpose: the code lives in ``lib/``.

    monailabel start_server --app apps/spine --studies sample-data [--conf KEY VALUE ...]
"""

import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the server imports this file by path, also from other folders
    sys.path.insert(0, str(REPO_ROOT))

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

from lib.server import SpineServerMixin  # noqa: E402
from lib.configs.spine import SpineConfig  # noqa: E402
from lib.labels import LABELS  # noqa: E402
from lib.model_store import MODEL_NAME, model_dir_from_conf  # noqa: E402

logger = logging.getLogger(__name__)


class SpineApp(SpineServerMixin, MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_config = SpineConfig()
        self.model_config.init(MODEL_NAME, model_dir_from_conf(conf), conf, None)
        os.makedirs(self.model_config.model_dir, exist_ok=True)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Lumbar spine MRI",
            description="L1-L5 vertebrae, discs L1-L2..L5-S1 and spinal canal, with active learning",
            version="1.0",
            labels=sorted(LABELS, key=LABELS.get),  # a list: the OHIF panel appends to it (a dict crashes it)
        )

    def init_infers(self):
        return self.model_config.infer()

    def init_trainers(self):
        return {MODEL_NAME: self.model_config.trainer()}

    def init_strategies(self):
        return self.model_config.strategy()

    def init_scoring_methods(self):
        return self.model_config.scoring_method()
