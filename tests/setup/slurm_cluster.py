"""A real single-node SLURM cluster for the tests, from Debian's packages: started here, stopped by its PIDs.

munged (as user munge), slurmctld and slurmd run in the foreground as children of this process, with every
file (config, key, state, spool, logs, sockets) under one folder, on free ports; nothing under /etc or /run is
touched, so a SLURM already on the machine is left alone. Clients find the cluster through SLURM_CONF (see
`env`). The node offers a CPU partition and a GPU partition with fake GPUs: a GRES whose `File=` are symlinks
named nvidia0, nvidia1, ... pointing to /dev/null, so a job that gets one sees CUDA_VISIBLE_DEVICES=<its index>.

What this sandbox needs and a real cluster does not: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
(no cgroups), no slurmdbd (so `sacct` fails: status checks must use `squeue`, and MinJobAge keeps finished jobs
visible to it), and SlurmdParameters=config_overrides so the node may declare more CPUs and memory than the
machine has (the workflow's SLURM profile asks for cluster-sized jobs).

By hand:  python tests/setup/slurm_cluster.py /tmp/slurm   (prints the SLURM_CONF to export; Ctrl-C stops it)
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# Where SLURM's clients look for the config after SLURM_CONF and /etc/slurm/slurm.conf. The plugin's job step
# drops every SLURM_* variable (SLURM_CONF included) before its nested `srun`, so inside a job only these two
# paths are seen: the cluster links this one to its folder for as long as it runs.
RUN_CONF = Path("/run/slurm/conf")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (CI runs as root)"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        return f"SLURM/munge binaries missing: {', '.join(missing)} (tests/setup/system-packages.sh installs them)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' missing (the munge package creates it)"
    if SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} exists: srun inside test jobs would reach that cluster instead of the test's"
    if RUN_CONF.exists() and not RUN_CONF.is_symlink():
        return f"{RUN_CONF} is in use by another SLURM"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


@dataclass
class SlurmCluster:
    root: Path
    cpus: int = 64
    memory_mb: int = 256000
    gpus: int = 2
    min_job_age: int = 600
    partitions: tuple[str, str] = ("cpu", "gpu")  # (CPU partition, GPU partition), as in workflow/profiles/slurm
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    linked_conf: bool = False

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, squeue, snakemake) needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge = pwd.getpwnam("munge")
        os.chown(root / "munge", munge.pw_uid, munge.pw_gid)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        for index in range(self.gpus):
            device = root / f"nvidia{index}"
            if not device.is_symlink():
                device.symlink_to("/dev/null")
        host = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = _free_ports(2)
        cpu_part, gpu_part = self.partitions
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=netest",
                    f"SlurmctldHost={host}(127.0.0.1)",  # no name lookup needed
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"AuthInfo=socket={root}/munge/munge.socket",
                    f"StateSaveLocation={root}/state",
                    f"SlurmdSpoolDir={root}/spool",
                    f"SlurmctldPidFile={root}/slurmctld.pid",
                    f"SlurmdPidFile={root}/slurmd.pid",
                    f"SlurmctldLogFile={root}/log/slurmctld.log",
                    f"SlurmdLogFile={root}/log/slurmd.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "GresTypes=gpu",
                    "DefMemPerCPU=500",
                    f"MinJobAge={self.min_job_age}",
                    "KillWait=2",
                    "InactiveLimit=0",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} "
                    f"Gres=gpu:{self.gpus} State=UNKNOWN",
                    f"PartitionName={cpu_part} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    f"PartitionName={gpu_part} Nodes={host} Default=NO MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        files = f"{root}/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{root}/nvidia0"
        (root / "gres.conf").write_text(f"NodeName={host} Name=gpu File={files}\n")
        if RUN_CONF.is_symlink():
            RUN_CONF.unlink()  # left by an earlier test cluster that was killed
        RUN_CONF.parent.mkdir(parents=True, exist_ok=True)
        RUN_CONF.symlink_to(root)
        self.linked_conf = True

    def _spawn(self, name: str, args: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.processes[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True, **kwargs,
        )
        log.close()

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}: {self.logs()}")
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {self.logs()}")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        munge_dir = self.root / "munge"
        self._spawn(
            "munged",
            [_binary("munged"), "--foreground", "--force", f"--socket={munge_dir}/munge.socket",
             f"--key-file={munge_dir}/munge.key", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user="munge", group="munge",
        )
        self._wait("munged", lambda: (munge_dir / "munge.socket").exists(), timeout)
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self._run("scontrol", "ping").returncode == 0 and "UP" in self._last, timeout)
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf)])
        self._wait("an idle node", lambda: self._node_state() == "idle", timeout)
        return self

    _last = ""

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([_binary(args[0]), *args[1:]], capture_output=True, text=True, env=self.env, timeout=20)
        self._last = proc.stdout + proc.stderr
        return proc

    def _node_state(self) -> str:
        proc = self._run("sinfo", "--noheader", "--format=%t", "--partition", self.partitions[1])
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still remembers (MinJobAge), as scontrol's key=value fields."""
        proc = self._run("scontrol", "show", "job", "--oneliner", "--details")
        if "No jobs in the system" in proc.stdout + proc.stderr:
            return []
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job failed: {proc.stderr.strip()}")
        return [_parse_fields(line) for line in proc.stdout.splitlines() if line.strip()]

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons this object started, by their PIDs: slurmd, slurmctld, munged."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            try:
                self._run("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and any(j.get("JobState") in ("RUNNING", "PENDING", "COMPLETING") for j in self.jobs()):
                    time.sleep(0.2)
            except (RuntimeError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.processes.clear()
        if self.linked_conf and RUN_CONF.is_symlink() and os.readlink(RUN_CONF) == str(self.root):
            RUN_CONF.unlink()
            self.linked_conf = False


def _parse_fields(line: str) -> dict[str, str]:
    """scontrol's one-line records: space-separated Key=Value pairs; values may hold '=' but not spaces."""
    fields: dict[str, str] = {}
    for token in line.split():
        if "=" in token:
            key, value = token.split("=", 1)
            fields[key] = value
    return fields


if __name__ == "__main__":

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-test").resolve())
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}   # cluster up; Ctrl-C stops it", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
