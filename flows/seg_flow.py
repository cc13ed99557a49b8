"""PetSegFlow: reproducible pet segmentation, from warehouse to a served model.

Run locally:            python flows/seg_flow.py run
Run on Kubernetes:      python flows/seg_flow.py run --with kubernetes
Inspect past runs:      petseg runs, petseg show latest, petseg lineage latest
Prove a run:            petseg verify latest
"""

import functools
import os
import sys

FLOW_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FLOW_DIR, ".."))
from petseg.lineage import runs  # noqa: E402
from petseg.model import determinism  # noqa: E402

# numpy reads its CPU pins once, when it loads (Metaflow loads it): pinned first, in every run and pod, so
# that calibration, metrics and baselines run the same kernel code on any CPU at the baseline or above
# (petseg.model.determinism).
determinism.pin_numpy(os.environ)
# Metaflow refuses to run or read runs as root with no user name (USERNAME): a root shell's command,
# `run` or `card get`, works as typed with the login name or "petseg" (petseg.lineage.runs.default_user).
runs.default_user(os.environ)

from metaflow import Config, FlowSpec, Parameter, card, config_expr, current, resources, retry, step, timeout  # noqa: E402,I001
# TensorFlow's C++ start-up notices (CPU features, end of a dataset) would fill every step's log;
# TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from petseg import codeversion  # noqa: E402
from petseg.flow import hooks, stages  # noqa: E402
from petseg.model import tune as tuning  # noqa: E402
from petseg.release import gate as gates  # noqa: E402

# What compute steps (tune, train, calibrate, evaluate) ask of a cluster; local runs ignore it.
# Change per run: python flows/seg_flow.py --config-value compute '{"gpu": 0, "cpu": 2, "memory": 4096}' run ...
compute_resources = resources(cpu=config_expr("compute.cpu"), memory=config_expr("compute.memory"),
                              gpu=config_expr("compute.gpu"))


@hooks.records  # every step: its stage in the lineage graph (and Pachyderm), OpenLineage events, run tags
class PetSegFlow(FlowSpec):
    """Reproducible pet segmentation (Oxford-IIIT Pet trimaps, U-Net).

    1. start: check the parameters and fix the run's settings (seed, mode, threads, code version).
    2. ingest: read and validate the source; shard it; fingerprint the data set.
    3. transform: split into training, validation, test and calibration (md5 of the sample id, or the
       release's official test list).
    4. trial: one short training per sampled configuration, in parallel.
    5. tune: keep every trial's result and pick the best.
    6. train: the final model with the selected settings.
    7. calibrate: isotonic calibration of pixel probabilities, per class.
    8. evaluate: the model beside baselines (and the serving champion) on validation and test data; the
       served mask (calibrated or raw, chosen on validation); a report card.
    9. release: the quality gate (validation data only: baselines and champion), then a signed release
       (manifest, SLSA provenance) and a deployment.
    Each stage reads and writes what petseg.lineage.graph.STAGES declares; when its step ends, that is recorded
    in the run's lineage graph (petseg lineage RUN), mirrored into Pachyderm and sent as OpenLineage events.
    """

    compute = Config("compute", default_value={"cpu": 2, "memory": 4096, "gpu": 1},
                     help="Cluster resources of the compute steps (tune, train, calibrate, evaluate).")
    # Evaluated once, where the run is launched (pods have no .git): the checkout's commit and changes.
    code = Config("code", default_value=codeversion.AT_LAUNCH,
                  parser=functools.partial(codeversion.at_launch, checkout=FLOW_DIR),
                  help="Set at launch, not by hand: the git commit of the flow's checkout and whether it has "
                       "uncommitted changes.")

    source = Parameter("source", default="synth:1200",
                       help="Data: synth:COUNT (embedded set generated from --seed), a directory or images.tar.gz "
                            "in Oxford layout, an http(s):// or s3:// prefix, or tfds:oxford_iiit_pet.")
    feedback = Parameter("feedback", default="",
                         help="Directory or s3:// prefix of labelled feedback samples to add to the source.")
    skip_bad = Parameter("skip_bad", default=False, type=bool,
                         help="Leave out bad samples (listed in the ingest report) instead of stopping.")
    split = Parameter("split", default="md5",
                      help="Split rule: md5 (md5 of the sample id mod 10: 0-6 training, 7 validation, 8 test, "
                           "9 calibration) or official (the source's annotations/test.txt is the test split).")
    seed = Parameter("seed", default=42, type=int, help="Seed for data generation, sampling, shuffling and weights.")
    deterministic = Parameter("deterministic", default=True, type=bool,
                              help="Strict mode: bitwise reproducible training (op determinism, fixed threads).")
    portable = Parameter("portable", default=False, type=bool,
                         help="Portable strict mode: CPU kernels pinned to the x86-64 AVX2 + FMA baseline, so that "
                              "other CPUs run the same kernel code (shown on one CPU by emulation, not yet across CPU "
                              "models: bench/device_check.sh checks another); training took 1.57x as long on an "
                              "AVX-512 machine (docs/PERFORMANCE.md).")
    threads = Parameter("threads", default=2, type=int,
                        help="Intra- and inter-op threads in strict mode; they change the weight bits, so they are "
                             "fixed here and recorded, not taken from the machine.")
    trials = Parameter("trials", default=2, type=int, help="Number of hyper-parameter trials.")
    tune_epochs = Parameter("tune_epochs", default=1, type=int, help="Epochs per tuning trial.")
    epochs = Parameter("epochs", default=12, type=int, help="Epochs for the final model.")
    arch = Parameter("arch", default="small", help="Model: small (fast on CPU) or mobilenetv2 (U-Net for real data).")
    image_size = Parameter("image_size", default=128, type=int,
                           help="Side of the square images the model sees (a multiple of 16); recorded in the "
                                "release manifest, and the server resizes requests to it.")
    batch_size = Parameter("batch_size", default=0, type=int,
                           help="Batch size of the final model; 0 takes the tuned one.")
    min_miou = Parameter("min_miou", default=0.5, type=float,
                         help="Quality gate floor: the validation mIoU a model must reach to be released.")
    min_margin = Parameter("min_margin", default=0.1, type=float,
                           help="Quality gate: how far the model's validation mIoU must lead the best baseline's.")
    tolerance = Parameter("tolerance", default=gates.DEFAULT_TOLERANCE, type=float,
                          help="Quality gate: how much validation mIoU the model may lose against the serving "
                               "champion, scored on the same images, and still replace it.")
    endpoint = Parameter("endpoint", default="petseg",
                         help="The endpoint a release is for: the stable name it serves under, and whose serving "
                              "(else last accepted) release is the champion it is compared with.")
    champion = Parameter("champion", default="auto",
                         help="The release the model is compared with: auto (the endpoint's: in the cluster when "
                              "--deploy goes there, else on this machine), none (judge against the baselines "
                              "alone), or a release location.")
    deploy = Parameter("deploy", default="local",
                       help="Where a released model goes: local (this machine's endpoint), kubernetes (a "
                            "Deployment and the endpoint's Service, no operator), operator (the server's "
                            "operator object: SeldonDeployment, KServe InferenceService or Seldon Core v2) or none.")
    canary = Parameter("canary", default=0, type=int,
                       help="On Kubernetes, above 0 the released model does not replace the serving one until "
                            "`petseg promote`: with --deploy kubernetes it waits Ready beside it, taking no "
                            "traffic; with --deploy operator it takes this percent of the traffic.")
    port = Parameter("port", default=0, type=int,
                     help="Port of a local endpoint when it is not running yet; 0 picks a free one (a running "
                          "endpoint keeps its port).")
    server = Parameter("server", default="seldon",
                       help="Model server of a deployment: seldon (Seldon Core v1 protocol), mlserver "
                            "(Open Inference Protocol, REST and gRPC) or, with --deploy operator, seldon-v2.")
    pachyderm = Parameter("pachyderm", default="",
                          help="Pachyderm address (host:port) to mirror lineage into; default $PACHD_ADDRESS.")
    lineage = Parameter("lineage", default="required",
                        help="required: a step fails when its lineage cannot be mirrored into Pachyderm or its "
                             "OpenLineage events cannot be delivered; best-effort: warn.")
    require_clean = Parameter("require_clean", default=False, type=bool,
                              help="Refuse a run launched from a checkout with uncommitted changes: it stops in "
                                   "its start step, so no model is released from unrecorded code.")

    @step
    def start(self):
        """Check the parameters and fix the run's settings."""
        self.parameters = stages.parameters({name: getattr(self, name) for name in current.parameter_names})
        self.settings = stages.settings(self.parameters, code=self.code)
        self.blob_root = stages.blob_root(self._datastore)
        self.next(self.ingest)

    @retry(times=2)
    @step
    def ingest(self):
        """Read and validate the source, write shards, fingerprint the data set."""
        self.ingest_report = stages.ingest(source=self.source, feedback=self.feedback, skip_bad=self.skip_bad,
                                           settings=self.settings, store=self.blob_root)
        self.dataset_fingerprint = self.ingest_report["fingerprint"]
        self.next(self.transform)

    @step
    def transform(self):
        """Split samples by the --split rule and write one shard set per split."""
        self.splits = stages.transform(self.ingest_report, store=self.blob_root, rule=self.split)
        self.trial_configs = tuning.sample_trials(self.trials, seed=self.settings["seed"])
        self.next(self.trial, foreach="trial_configs")

    @compute_resources
    @timeout(hours=2)
    @step
    def trial(self):
        """Train one short trial of a sampled configuration; report validation loss and mIoU."""
        self.result = stages.run_trial(self.input, splits=self.splits, store=self.blob_root, arch=self.arch,
                                       epochs=self.tune_epochs, settings=self.settings)
        self.next(self.tune)

    @step
    def tune(self, inputs):
        """Keep every trial's result and pick the best (lowest validation loss, ties by index)."""
        self.merge_artifacts(inputs, exclude=["result"])
        self.trial_results, self.best = stages.select(i.result for i in inputs)
        self.next(self.train)

    @compute_resources
    @timeout(hours=6)
    @step
    def train(self):
        """Train the final model with the selected settings; keep weights, fingerprint, logs, environment."""
        trained = stages.train(self.best, splits=self.splits, store=self.blob_root, arch=self.arch,
                               epochs=self.epochs, batch_size=self.batch_size, settings=self.settings)
        self.model_keras, self.model_fingerprint = trained["model_keras"], trained["fingerprint"]
        self.history, self.tensorboard_logs = trained["history"], trained["tensorboard_logs"]
        self.environment = trained["environment"]
        self.next(self.calibrate)

    @compute_resources
    @step
    def calibrate(self):
        """Fit isotonic calibration on the calibration split; ECE before and after."""
        self.calibration, self.calibration_report = stages.calibrate(
            self.model_keras, splits=self.splits, store=self.blob_root, settings=self.settings)
        self.next(self.evaluate)

    @card(type="blank", id="report")
    @compute_resources
    @step
    def evaluate(self):
        """The model beside the baselines and the champion on validation and test data, and the report card."""
        self.champion_release = stages.champion(endpoint=self.endpoint, choice=self.champion, deploy=self.deploy,
                                                server=self.server)
        self.metrics, samples = stages.evaluate(self.model_keras, self.calibration, splits=self.splits,
                                                store=self.blob_root, settings=self.settings,
                                                champion=self.champion_release)
        stages.report_card(metrics=self.metrics, history=self.history, trials=self.trial_results,
                           calibration_report=self.calibration_report, samples=samples)
        self.next(self.release)

    @hooks.release_privileges  # on Kubernetes, only this step's pod gets the signing key and the right to deploy
    @step
    def release(self):
        """Quality gate on validation mIoU (baselines, champion); a passing model gets a signed release and a
        deployment."""
        self.released, self.gate_message = stages.gate(self.metrics, min_miou=self.min_miou,
                                                       min_margin=self.min_margin, tolerance=self.tolerance)
        print(self.gate_message)
        self.manifest, self.signatures, self.deployment = None, None, None
        if self.released:  # signed: model.sig over every file, and the run's SLSA provenance
            self.manifest, self.signatures = stages.export_release(
                model_keras=self.model_keras, calibration=self.calibration, metrics=self.metrics,
                settings=self.settings, parameters=self.parameters, environment=self.environment,
                store=self.blob_root, **self._fingerprints())
            self.deployment = stages.deploy(self.manifest, target=self.deploy, port=self.port,
                                            server=self.server, endpoint=self.endpoint, canary=self.canary)
        self.next(self.end)

    @hooks.tag_when_finished  # the launcher tags the run dataset:, model:, release: from its artifacts
    @step
    def end(self):
        """Summarise the run and say where to look."""
        self.summary = stages.summary(metrics=self.metrics, released=self.released, manifest=self.manifest,
                                      deployment=self.deployment, **self._fingerprints())
        print(stages.closing_words(self.summary, metrics=self.metrics, gate_message=self.gate_message))

    def _fingerprints(self) -> dict:
        """The run's data set and model fingerprints, as the step glue takes them."""
        return {"dataset_fingerprint": self.dataset_fingerprint, "model_fingerprint": self.model_fingerprint}


if __name__ == "__main__":
    PetSegFlow()
