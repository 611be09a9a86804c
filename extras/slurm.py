"""Multi-process runs under SLURM's srun: train.py joins the step's process group as it would under torchrun.

    srun --ntasks-per-node 2 python train.py ...      (references/slurm_train.sh)

utils.init_distributed_mode calls `set_torchrun_env` inside an srun step with several tasks: the rank, world size
and local rank come from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, MASTER_ADDR is the step's first node
and MASTER_PORT is derived from the job id.
"""

import subprocess


def slurm_master_port(job_id):
    """A port from the job id (20000-39999): two jobs sharing a node do not both take torchrun's 29500."""
    return 20000 + int(job_id) % 20000 if str(job_id).isdigit() else 29500


def master_addr(nodelist):
    """First host of a SLURM node list such as 'gpu[01-04],cpu7' (scontrol expands the ranges)."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]  # a single-node list is already a host name


def set_torchrun_env(env):
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT into `env` (os.environ) from SLURM's."""
    nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
    env.setdefault("MASTER_ADDR", master_addr(nodes))
    env.setdefault("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID"))))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
