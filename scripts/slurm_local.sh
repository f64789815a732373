#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the cluster tests (tests/test_slurm.py) and for
# trying `attnbench run --executor slurm` without a cluster. It runs munged, MariaDB and slurmdbd
# (job accounting: `sacct`, which reports how a job ended), slurmctld and slurmd on 127.0.0.1, with
# one CPU-only partition `debug` sized to the machine (no cgroups: proctrack/linuxproc). Everything
# lives in one folder, $ATTNBENCH_SLURM_DIR (default /tmp/attnbench-slurm), on ports of its own;
# clients find it through SLURM_CONF, so the system's configuration is never touched.
#
#   scripts/slurm_local.sh install    install the packages (apt-get, as root) unless present
#   scripts/slurm_local.sh start      configure and start from a clean state (as root); prints
#                                     the `export SLURM_CONF=...` that clients need
#   scripts/slurm_local.sh stop       stop every daemon it started and every job still running
#   scripts/slurm_local.sh node-down  a node failure: slurmd, its job steps and their processes
#                                     killed at once (slurmctld marks the node DOWN soon after)
#   scripts/slurm_local.sh node-up    slurmd started again and the node returned to service
#   scripts/slurm_local.sh status     the daemons and `sinfo`
#   scripts/slurm_local.sh check      whether everything is installed and this user can start it
set -euo pipefail

DIR="${ATTNBENCH_SLURM_DIR:-/tmp/attnbench-slurm}"
PORT="${ATTNBENCH_SLURM_PORT:-16817}"  # slurmctld; slurmd, slurmdbd and MariaDB take the next three
CONF="$DIR/etc/slurm.conf"
NODE="$(hostname -s)"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
PROGRAMS=(munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr)
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "slurm_local: $*" >&2; }
missing_programs() {
    local program
    for program in "${PROGRAMS[@]}"; do command -v "$program" > /dev/null || echo "$program"; done
}

install() {
    local missing
    missing="$(missing_programs)"
    [[ -z "$missing" ]] && { say "installed"; return 0; }
    if [[ $EUID -ne 0 ]] || ! command -v apt-get > /dev/null; then
        say "missing $(echo $missing) and cannot install them (needs root and apt-get)"
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" > /dev/null
    say "installed ${PACKAGES[*]}"
}

# Wait up to $1 seconds for the command that follows to succeed.
wait_for() {
    local seconds="$1"; shift
    local deadline=$((SECONDS + seconds))
    until "$@" > /dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

memory_mib() { awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo; }

write_configuration() {
    local cpus memory password
    cpus="$(nproc)"
    memory="$(memory_mib)"
    password="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
    mkdir -p "$DIR"/{etc,log,ctld,spool,munge,mysql}
    chmod 700 "$DIR/munge"
    head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    echo "$password" > "$DIR/etc/db_password"
    cat > "$CONF" <<EOF
ClusterName=attnbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$DIR/munge/munge.socket
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=5
MessageTimeout=3
KillWait=5
MinJobAge=300
DefMemPerCPU=$((memory / cpus))
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf" "$DIR/etc/db_password"
}

start_munge() {
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 10 test -S "$DIR/munge/munge.socket"
}

start_database() {
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --skip-test-db \
        --auth-root-authentication-method=socket > "$DIR/log/mariadb-install.log" 2>&1
    mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --bind-address=127.0.0.1 \
        --port=$((PORT + 3)) --socket="$DIR/mysql/mysqld.sock" --pid-file="$DIR/mariadb.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-name-resolve > /dev/null 2>&1 &
    wait_for 30 mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root -e "SELECT 1"
    mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db_password")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurm() {
    slurmdbd
    wait_for 30 sacctmgr --noheader list cluster
    sacctmgr --immediate add cluster attnbench > /dev/null
    slurmctld
    wait_for 30 scontrol ping
    slurmd
    wait_for 30 node_is_up
}

node_is_up() { sinfo --noheader --nodes="$NODE" --format=%T | grep -qE '^(idle|mixed|allocated)'; }

check() {
    [[ -z "$(missing_programs)" ]] || { say "missing $(echo $(missing_programs)); run: $0 install"; return 1; }
    [[ $EUID -eq 0 ]] || { say "start needs root (the daemons run as root)"; return 1; }
}

start() {
    check
    stop > /dev/null 2>&1 || true
    rm -rf "$DIR"
    write_configuration
    start_munge || { say "munged did not start; see $DIR/log/munged.log"; stop; return 1; }
    start_database || { say "MariaDB did not start; see $DIR/log/mariadb*.log"; stop; return 1; }
    start_slurm || { say "SLURM did not start; see $DIR/log/slurm*.log"; stop; return 1; }
    say "running: partition debug, node $NODE ($(nproc) CPUs, $(memory_mib) MiB), logs in $DIR/log"
    echo "export SLURM_CONF=$CONF"
}

# The job step daemons of this cluster (they keep its slurmd's log open) and every process
# under them: what runs on the node.
job_processes() {
    local entry pid steps=""
    for entry in /proc/[0-9]*; do
        pid="${entry#/proc/}"
        [[ "$(readlink "$entry/exe" 2> /dev/null)" == */slurmstepd* ]] || continue
        ls -l "$entry/fd" 2> /dev/null | grep -qF "$DIR/log/slurmd.log" && steps+=" $pid"
    done
    [[ -n "$steps" ]] || return 0
    ps -e -o pid= -o ppid= | awk -v steps="$steps" '
        { parent[$1] = $2 }
        END {
            n = split(steps, list, " ")
            for (i = 1; i <= n; i++) keep[list[i]] = 1
            do {
                grew = 0
                for (pid in parent) if (!(pid in keep) && (parent[pid] in keep)) { keep[pid] = 1; grew = 1 }
            } while (grew)
            for (pid in keep) print pid
        }'
}

# Kill the given processes and every job process, all frozen first so that none can report the
# others' end to slurmctld (a node that fails reports nothing).
kill_with_jobs() {
    local pids
    pids="$* $(job_processes | tr '\n' ' ')"
    [[ -n "${pids// }" ]] || return 0
    kill -STOP $pids 2> /dev/null || true
    kill -KILL $pids 2> /dev/null || true
}

# The pids in the given pid files (the files removed).
pids_of() {
    local pid_file
    for pid_file in "$@"; do
        [[ -f "$pid_file" ]] && echo "$(cat "$pid_file")"
        rm -f "$pid_file"
    done
}

all_exited() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2> /dev/null && return 1; done
    return 0
}

# Everything killed at once: the cluster's state is thrown away, so nothing needs a clean
# shutdown (which would cost seconds per daemon).
stop() {
    local daemons
    daemons="$(pids_of "$DIR"/{slurmd,slurmctld,slurmdbd,mariadb}.pid "$DIR/munge/munged.pid" | tr '\n' ' ')"
    kill_with_jobs $daemons
    wait_for 10 all_exited $daemons || true
    rm -rf "$DIR/mysql" "$DIR/ctld" "$DIR/spool"
    say "stopped (logs kept in $DIR/log)"
}

node_down() {
    kill_with_jobs "$(cat "$DIR/slurmd.pid" 2> /dev/null)"
    rm -f "$DIR/slurmd.pid"
    say "node $NODE down: slurmd and its jobs killed"
}

node_up() {
    slurmd
    wait_for 30 bash -c "sinfo --noheader --nodes=$NODE --format=%T | grep -qv '^down'" || true
    scontrol update nodename="$NODE" state=resume 2> /dev/null || true
    wait_for 30 node_is_up || { say "node $NODE did not come back; see $DIR/log/slurmd.log"; return 1; }
    say "node $NODE up"
}

status() {
    local daemon
    for daemon in munge/munged mariadb slurmdbd slurmctld slurmd; do
        if [[ -f "$DIR/$daemon.pid" ]] && kill -0 "$(cat "$DIR/$daemon.pid")" 2> /dev/null; then
            echo "${daemon#munge/}: running"
        else
            echo "${daemon#munge/}: stopped"
        fi
    done
    sinfo 2> /dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    node-down) node_down ;;
    node-up) node_up ;;
    status) status ;;
    check) check ;;
    *) echo "usage: $0 install|start|stop|node-down|node-up|status|check" >&2; exit 2 ;;
esac
