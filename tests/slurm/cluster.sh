#!/usr/bin/env bash
# A throw-away single-node Slurm cluster with accounting, for tests.
#
#   tests/slurm/cluster.sh start STATE_DIR   # prints one line when the node is idle and sacct answers
#   tests/slurm/cluster.sh stop  STATE_DIR   # stops exactly the daemons that `start` recorded
#   tests/slurm/cluster.sh env   STATE_DIR   # prints `export SLURM_CONF=...` for a shell
#
# Needs root and the Debian packages that tests/slurm/install.sh installs; installs nothing itself.
# Everything lives in STATE_DIR: slurm.conf, slurmdbd.conf, the munge key and socket, the MariaDB datadir,
# the spool/state folders, the logs and one pid file per daemon (pids/*.pid). Ports are picked free at start,
# so several clusters (one per STATE_DIR) can run side by side. Client commands (sbatch, sacct, submitit)
# find the cluster through SLURM_CONF=STATE_DIR/slurm.conf.
#
# Daemons run in the foreground mode of each program, each in its own session (setsid), with stdin from
# /dev/null and output to STATE_DIR/log/: the pid recorded is the daemon itself, and a caller that captures
# this script's output is not kept waiting by the daemons. `stop` cancels the cluster's jobs, then sends
# SIGTERM to the recorded pids in reverse start order and waits for each (SIGKILL after a grace period).
# A start after a stop works on the same STATE_DIR (the database and the cluster state are kept) or a new one.
set -euo pipefail

STARTING=0
# A failed start stops what it had started.
die() {
    echo "cluster.sh: $*" >&2
    if (( STARTING )); then
        STARTING=0
        stop >/dev/null 2>&1 || true
    fi
    exit 1
}

usage() { die "usage: $0 start|stop|env STATE_DIR"; }

[[ $# -eq 2 ]] || usage
ACTION=$1
STATE=$2
[[ -n "$STATE" ]] || usage
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd -P)

CONF=$STATE/slurm.conf
PIDS=$STATE/pids
LOG=$STATE/log
MUNGE_SOCKET=$STATE/munge/munge.socket
MYSQL_SOCKET=$STATE/mysql/mysqld.sock
export SLURM_CONF=$CONF

# Time limits, in seconds.
READY_TIMEOUT=${SLURM_CLUSTER_READY_TIMEOUT:-90}
STOP_GRACE=${SLURM_CLUSTER_STOP_GRACE:-20}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# wait_for DESCRIPTION NAME COMMAND...: retry COMMAND until it succeeds; fail early if daemon NAME dies.
wait_for() {
    local what=$1 name=$2 deadline=$((SECONDS + READY_TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [[ -n "$name" ]] && ! alive "$name"; then
            die "$what: the daemon exited; see $LOG/"
        fi
        (( SECONDS < deadline )) || die "$what: not ready after ${READY_TIMEOUT}s; see $LOG/"
        sleep 0.2
    done
    echo "$what ready at +$(elapsed "$T0")s" >>"$LOG/start-times"
}

# The start time of a process (field 22 of /proc/PID/stat), to tell a recorded daemon from a later process
# that got the same pid.
starttime() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "${20}"; }

# alive NAME: the recorded daemon still runs (same pid and start time, not a zombie).
alive() {
    local pid start s
    [[ -f $PIDS/$1.pid ]] && read -r pid start <"$PIDS/$1.pid" || return 1
    s=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ ${s%% *} != Z ]] || return 1
    [[ $(starttime "$pid") == "$start" ]]
}

# launch NAME COMMAND...: start a foreground daemon in its own session and record its pid.
launch() {
    local name=$1
    shift
    # setsid, run from a non-interactive script, is not a process-group leader: it calls setsid() and
    # execs the command, so $! is the daemon's own pid.
    # SLURM_TEST_CLUSTER marks the daemons and the slurmstepd processes that slurmd starts (see leftovers).
    SLURM_TEST_CLUSTER=$STATE setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    local pid=$!
    echo "$pid $(starttime "$pid")" >"$PIDS/$name.pid"
    echo "$name" >>"$PIDS/order"
}

# N TCP ports on this machine that no socket uses, all different: random picks in 20000-31999, below Linux's
# default range for ephemeral ports (32768-60999), checked against /proc/net/tcp{,6}.
free_ports() {
    local used=" " f local_addr port picked=() tries=0
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        while read -r _ local_addr _; do
            [[ $local_addr == *:* ]] || continue
            used+="$((16#${local_addr##*:})) "
        done < <(tail -n +2 "$f")
    done
    while (( ${#picked[@]} < $1 )); do
        (( tries++ < 1000 )) || die "no free TCP port found"
        port=$((20000 + RANDOM % 12000))
        [[ $used == *" $port "* ]] && continue
        used+="$port "
        picked+=("$port")
    done
    echo "${picked[*]}"
}

write_config() {
    local host node node_line ctld_port slurmd_port dbd_port mysql_port
    host=$(hostname -s)
    # The node as slurmd sees it (name, CPUs, sockets, cores, memory), less its UpTime line.
    node_line=$(slurmd -C | grep '^NodeName=')
    node=${node_line%% *}
    node=${node#NodeName=}
    local ports
    ports=$(free_ports 4)
    read -r ctld_port slurmd_port dbd_port mysql_port <<<"$ports"

    cat >"$CONF" <<EOF
# Single-node test cluster; written by tests/slurm/cluster.sh.
ClusterName=testcluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds after it ended (default 120).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Pending jobs that no event wakes (a requeued job whose hold has passed) wait for the next periodic pass:
# make that every 2 s rather than 60 s (main) / 30 s (backfill).
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Quick kills and short-lived records of finished jobs in slurmctld (sacct keeps them all).
KillWait=5
MinJobAge=60
InactiveLimit=0
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# For the slurmdbd connection, AccountingStoragePass names the munge socket (AuthInfo is not used there).
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
# OverSubscribe=FORCE:4 lets up to 4 jobs share each core, so several small jobs run at once.
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    : >"$STATE/plugstack.conf"

    local pass
    pass=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    # slurmdbd insists that its config is readable by SlurmUser only.
    (umask 077 && cat >"$STATE/slurmdbd.conf" <<EOF
# Written by tests/slurm/cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$mysql_port
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    )
    echo "$mysql_port" >"$STATE/mysql/port"
    echo "$pass" >"$STATE/mysql/slurm-password"
    chmod 600 "$STATE/mysql/slurm-password"
}

mysql_port() { cat "$STATE/mysql/port"; }

start() {
    T0=$(now)
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    # Unix socket paths (munge's, MariaDB's, slurmd's per-step ones) must fit in 107 bytes.
    (( ${#STATE} <= 64 )) || die "STATE_DIR path too long for the unix sockets in it (${#STATE} > 64 chars): $STATE"
    local b
    for b in munged mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sinfo sacct sacctmgr scontrol scancel squeue setsid; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || die "missing $b (run tests/slurm/install.sh)"
    done
    export PATH=$PATH:/usr/sbin:/sbin
    if [[ -s $PIDS/order ]]; then
        local name
        while read -r name; do
            if alive "$name"; then
                die "already running in $STATE (stop it first)"
            fi
        done <"$PIDS/order"
    fi
    rm -rf "$PIDS"
    mkdir -p "$PIDS" "$LOG" "$STATE/run" "$STATE/munge" "$STATE/mysql" "$STATE/slurmctld" "$STATE/slurmd"
    chmod 755 "$STATE/munge"
    STARTING=1
    if [[ ! -f $CONF ]]; then
        write_config
    fi

    # munge: own key, socket, pid, log and seed, all in STATE_DIR/munge. --force: run even where munged
    # finds the folders above STATE_DIR too open for its taste (it only warns then).
    if [[ ! -f $STATE/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
        chmod 400 "$STATE/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    launch munged munged --foreground --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$LOG/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for munged munged bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"

    # MariaDB: own datadir, socket and TCP port on 127.0.0.1, run as root; no system config read.
    local datadir=$STATE/mysql/data
    mkdir -p "$STATE/mysql/tmp"
    # Its own tmpdir: instances that share /tmp can clash on temporary table names.
    local mysqld_opts=(--no-defaults --user=root --datadir="$datadir" --tmpdir="$STATE/mysql/tmp" --socket="$MYSQL_SOCKET"
        --port="$(mysql_port)" --bind-address=127.0.0.1 --pid-file="$STATE/mysql/mysqld.pid"
        --log-error="$LOG/mysqld.log" --innodb-buffer-pool-size=128M --innodb-log-file-size=16M
        --innodb-lock-wait-timeout=900 --max-allowed-packet=16M --performance-schema=OFF
        --skip-name-resolve)
    if [[ ! -d $datadir/mysql ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$datadir" --tmpdir="$STATE/mysql/tmp" \
            --auth-root-authentication-method=socket \
            --skip-test-db >>"$LOG/mariadb-install-db.out" 2>&1 || die "mariadb-install-db failed; see $LOG/"
    fi
    launch mysqld /usr/sbin/mariadbd "${mysqld_opts[@]}"
    wait_for mariadbd mysqld mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping
    # Every start (idempotent): also right after a start that failed between writing the config and here.
    local pass
    pass=$(cat "$STATE/mysql/slurm-password")
    mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot <<EOF || die "could not create the database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

    # slurmdbd finds slurmdbd.conf beside SLURM_CONF.
    launch slurmdbd slurmdbd -D
    wait_for slurmdbd slurmdbd sacctmgr -n show cluster

    launch slurmctld slurmctld -D -i
    wait_for slurmctld slurmctld scontrol ping
    # slurmctld registers the cluster in the database on first contact; sacct answers once it has.
    wait_for "cluster registration" "" bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx testcluster"

    launch slurmd slurmd -D
    wait_for "node idle" slurmd bash -c "sinfo -h -o %t | grep -qx idle"
    wait_for sacct "" sacct -n -X -a

    STARTING=0
    echo "slurm cluster ready in $(elapsed "$T0")s: export SLURM_CONF=$CONF"
}

# This cluster's leftover processes, if any: slurmstepd (it inherits slurmd's SLURM_TEST_CLUSTER=STATE_DIR
# marker) and job processes (their environment holds a SLURM_JOB_ID and this cluster's SLURM_CONF).
# Matched on those exact environment entries, never on a program name.
leftovers() {
    local dir e job conf
    local -a entries
    for dir in /proc/[0-9]*; do
        [[ ${dir#/proc/} != "$BASHPID" ]] || continue
        { mapfile -d "" -t entries <"$dir/environ"; } 2>/dev/null || continue
        job=0 conf=0
        for e in "${entries[@]}"; do
            case $e in
                "SLURM_TEST_CLUSTER=$STATE") job=1 conf=1; break ;;
                SLURM_JOB_ID=*) job=1 ;;
                "SLURM_CONF=$CONF") conf=1 ;;
            esac
        done
        (( job && conf )) && echo "${dir#/proc/}"
    done
    return 0
}

stop() {
    local t0
    t0=$(now)
    export PATH=$PATH:/usr/sbin:/sbin
    if [[ -s $PIDS/order ]]; then
        # Cancel this cluster's jobs while slurmctld and slurmd still run, so that the job steps (slurmstepd and
        # the job processes) end through Slurm, then wait until the node holds no job step.
        if alive slurmctld && alive slurmd; then
            local ids
            ids=$(squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ')
            [[ -z ${ids// } ]] || scancel $ids >/dev/null 2>&1 || true
            local deadline=$((SECONDS + STOP_GRACE))
            while (( SECONDS < deadline )); do
                # slurmstepd keeps a socket per step in the spool dir (<node>_<job>.<step>) while it lives.
                if [[ -z $(squeue -h -o %i 2>/dev/null | head -1) ]] && ! compgen -G "$STATE/slurmd/*_[0-9]*.*" >/dev/null; then
                    break
                fi
                sleep 0.2
            done
        fi
        # Stop in reverse start order: slurmd, slurmctld, slurmdbd, mariadbd, munged.
        local name pid
        for name in $(tac "$PIDS/order"); do
            alive "$name" || continue
            read -r pid _ <"$PIDS/$name.pid"
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + STOP_GRACE))
            while alive "$name"; do
                if (( SECONDS >= deadline )); then
                    echo "cluster.sh: $name (pid $pid) ignored SIGTERM for ${STOP_GRACE}s: SIGKILL" >&2
                    kill -KILL "$pid" 2>/dev/null || true
                    deadline=$((SECONDS + STOP_GRACE))
                fi
                sleep 0.1
            done
        done
        rm -f "$PIDS/order"
    fi
    # Normally none: job steps that outlived the cancel (a slurmctld that had died, a stuck step).
    local left
    left=$(leftovers | tr '\n' ' ')
    if [[ -n ${left// } ]]; then
        echo "cluster.sh: killing leftover job processes of this cluster: $left" >&2
        kill -KILL $left 2>/dev/null || true
    fi
    echo "slurm cluster stopped in $(elapsed "$t0")s"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
