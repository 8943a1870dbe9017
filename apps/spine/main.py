"""MONAI Label app for lumbar spine MRI. Thin on purpose: the code lives in ``lib/``.

    monailabel start_server --app apps/spine --studies sample-data [--conf KEY VALUE ...]
"""

import logging
import os

from monailabel.interfaces.app import MONAILabelApp

from lib.configs.spine import SpineConfig
from lib.lifecycle.model_store import MODEL_NAME, model_dir_from_conf
from lib.pipeline.labels import LABELS
from lib.server.app import SpineServerMixin

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
