"""The Flower ServerApp: the server part of federated/loop.py (Federation) with Flower nodes as the clients.

Start: ask every node which client (partition) it holds and how many samples it trains on, until every client
of the run has a node; then the output folder exactly as main_sft.py/main_dpo.py keep it (run_dir.py's lock,
refusal, args.json and --resume; checkpoints and metrics through Federation). Each round: Federation.plan gives
the sampled clients' tasks, each goes to its node with the global vector (and what the algorithm's client hooks
read), the replies go to Federation.finish_round. A node that fails or does not answer is logged as a failed
client and the round aggregates the others; with fewer than min-replies answers its failed clients are asked
again (round-retries), then the run stops with a checkpoint of every finished round. With run-config secagg the
round's exchange is Flower's SecAgg+ workflow instead (flower_app/secure.py): the same tasks out, only the
weighted mean update back, and a retry redoes the whole round.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flower_app.config import RunSettings, parse_run_config
from flower_app.messages import Exchange, payload_bytes, read_result, task_content

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context)
    except SystemExit as stop:
        if stop.code in (None, 0):
            raise
        # Flower records a run as failed (flwr ls, flower_app.deploy wait) and logs why only for an Exception; a
        # SystemExit would end a simulation's ServerApp thread silently.
        raise RunFailed(str(stop.code)) from None


def run(grid: Grid, context: Context) -> None:
    from federated.run_dir import RunGuard
    from utils.console import configure_console

    settings = parse_run_config(context.run_config)
    s = settings.script_args
    configure_console(s.log_level, quantizes=s.load_in_8bit or s.load_in_4bit)
    with RunGuard(s.output_dir, command=f"flwr run . <connection> --run-config "
                                        f"'output-dir=\"{s.output_dir}\" resume=true' (and the same other keys)"):
        serve(grid, settings, context)


class RunFailed(Exception):
    """The run stopped on bad input or too few nodes or replies; the message says why and what to do."""


class NotEnoughReplies(SystemExit):
    """A round ended with fewer replies than min-replies, retries included."""


def gather(tasks: list, send, min_replies: int, retries: int, round_number: int,
           whole_round: bool = False) -> Exchange:
    """Send the round's tasks with `send(tasks) -> Exchange`; while fewer than min_replies clients answered, send
    the failed clients' tasks again, at most `retries` times (whole_round: every task again, and the new attempt
    replaces the last: a secure round's sum cannot be merged with another's). Never returns fewer than
    min(min_replies, tasks) results: raises NotEnoughReplies instead (an empty set is never aggregated)."""
    needed = min(min_replies, len(tasks))
    exchange, pending = Exchange(), list(tasks)
    for attempt in range(retries + 1):
        answer = send(pending)
        if whole_round:
            exchange.results, exchange.failed, exchange.summed = {}, {}, answer.summed
        exchange.results.update(answer.results)
        exchange.uploaded += answer.uploaded
        exchange.downloaded += answer.downloaded
        exchange.failed = {k: reason for k, reason in {**exchange.failed, **answer.failed}.items()
                           if k not in exchange.results}
        failed = [task for task in tasks if task.client in exchange.failed]
        if not failed or len(exchange.results) >= needed or attempt == retries:
            break
        pending = list(tasks) if whole_round else failed
        logger.warning("Round %d: %d of %d clients answered (min-replies %d); asking clients %s again (retry %d of "
                       "%d)", round_number, len(exchange.results), len(tasks), needed,
                       [task.client for task in pending], attempt + 1, retries)
    for k, reason in exchange.failed.items():
        logger.warning("Round %d: client %d failed (%s); dropped from this round", round_number, k, reason)
    if len(exchange.results) < max(needed, 1):
        raise NotEnoughReplies(
            f"Round {round_number}: {len(exchange.results)} of {len(tasks)} sampled clients answered, fewer than "
            f"min-replies {needed}, after {retries} retries (failed: "
            f"{'; '.join(f'client {k}: {r}' for k, r in exchange.failed.items())}).")
    return exchange


def serve(grid: Grid, settings: RunSettings, context: Context) -> None:
    from federated.methods import make_algorithm
    from federated.loop import Federation
    from federated.privacy import make_privacy
    from federated.run_dir import prepare_run_dir, settings_of
    from flower_app.training import load_server_model, lr_min

    s, f = settings.script_args, settings.fed_args
    nodes = discover(grid, settings)  # client -> (node id, sample count)
    f.num_clients = len(nodes)
    if f.sample_clients > f.num_clients:
        logger.warning("sample-clients %d > the run's %d clients: sampling all of them each round.",
                       f.sample_clients, f.num_clients)
        f.sample_clients = f.num_clients
    counts = [nodes[k][1] for k in range(f.num_clients)]
    algorithm = make_algorithm(f, f.num_clients)
    privacy = make_privacy(f, s, counts)
    prepare_run_dir(s.output_dir, settings_of(*settings.configs), resume=s.resume, overwrite=s.overwrite_output_dir)
    model, flat = load_server_model(settings)
    federation = Federation(s, f, model, flat, counts, lr_min(settings.task), privacy=privacy, algorithm=algorithm)
    run = federation.run
    node_of = {k: node for k, (node, _) in nodes.items()}
    asked = set(node_of.values())

    if settings.flower.secagg:  # a round is all or nothing: a retry sends every task again (flower_app/secure.py)
        from flower_app.secure import client_weights, secure_exchange
        max_weight = float(max(client_weights(federation)))

    def send(pending: list) -> Exchange:
        rejoin(grid, node_of, counts, settings.flower.wait_for_nodes, asked)  # before every attempt
        if settings.flower.secagg:
            return secure_exchange(grid, context, federation, pending, node_of, settings, max_weight)
        return send_tasks(grid, federation, pending, node_of, settings)

    for t in range(run.round, f.num_rounds):
        start = time.perf_counter()
        tasks = federation.plan(t)
        try:
            exchange = gather(tasks, send, settings.flower.min_replies, settings.flower.round_retries, t + 1,
                              whole_round=settings.flower.secagg)
        except NotEnoughReplies as stop:
            if run.round and not (Path(s.output_dir) / f"checkpoint-{run.round}").is_dir():
                federation.save()  # a stop never loses finished rounds
            raise SystemExit(f"{stop} Rounds 1-{run.round} are checkpointed in {s.output_dir}; bring the nodes "
                             f"back and continue with run-config resume=true.") from None
        results = [exchange.results[task.client] for task in tasks if task.client in exchange.results]
        row = federation.finish_round(tasks, results, time.perf_counter() - start, failed=sorted(exchange.failed),
                                      bytes_moved=(exchange.uploaded, exchange.downloaded), summed=exchange.summed)
        logger.info("Round %d/%d: mean loss %.4f, %d replies, failed %s, %.1f s", run.round, f.num_rounds,
                    row["mean_loss"], len(results), row["failed_clients"], row["round_time_s"])


def send_tasks(grid: Grid, federation, tasks: list, node_of: dict, settings: RunSettings) -> Exchange:
    """One exchange with the nodes of `tasks`' clients: a client whose node is gone (before or while it trains),
    whose reply is an error, or that does not answer within round-timeout has failed."""
    run, algorithm = federation.run, federation.algorithm
    exchange = Exchange()
    connected = set(grid.get_node_ids())
    messages, client_of = [], {}
    for task in tasks:
        node = node_of[task.client]
        if node not in connected:
            exchange.failed[task.client] = f"node {node} is disconnected"
            continue
        content = task_content(task, federation.num_clients, run.x, run.server_state,
                               run.client_store.get(task.client, {}), algorithm.shared_with_clients)
        exchange.downloaded += payload_bytes(content)
        # The TTL lets a task of a run that stopped expire on the SuperLink instead of waiting for its node.
        messages.append(Message(content, node, "train", ttl=settings.flower.round_timeout,
                                group_id=str(task.round_idx + 1)))
    grid.push_messages(messages)
    for message, task in zip(messages, [t for t in tasks if t.client not in exchange.failed]):
        client_of[message.metadata.message_id] = task.client
    for message_id, reply in collect_replies(grid, client_of, node_of, settings.flower.round_timeout).items():
        k = client_of[message_id]
        if isinstance(reply, str):
            exchange.failed[k] = reply
        elif reply.has_error():
            exchange.failed[k] = f"error {reply.error.code}: {(reply.error.reason or '').strip()[-300:]}"
        else:
            exchange.results[k] = read_result(reply.content, run.x.device)
            exchange.uploaded += payload_bytes(reply.content)
    return exchange


POLL_S, LIVENESS_S = 0.2, 2.0  # how often replies are pulled, and how often the nodes' liveness is checked


def collect_replies(grid: Grid, client_of: dict, node_of: dict, timeout: float) -> dict:
    """message id -> its reply, or why there is none: the node left (the SuperLink no longer lists it: a
    SuperNode that stopped, or one whose heartbeats lapsed) or the timeout passed. Grid.send_and_receive would
    wait out the whole timeout for a node that is gone, and pulls every 3 s; this pulls every POLL_S."""
    waiting, replies = set(client_of), {}
    deadline, next_check = time.monotonic() + timeout, time.monotonic() + LIVENESS_S
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            replies[reply.metadata.reply_to_message_id] = reply
            waiting.discard(reply.metadata.reply_to_message_id)
        if waiting and time.monotonic() > next_check:
            connected, next_check = set(grid.get_node_ids()), time.monotonic() + LIVENESS_S
            for message_id in [m for m in waiting if node_of[client_of[m]] not in connected]:
                replies[message_id] = f"node {node_of[client_of[message_id]]} left during the round"
                waiting.discard(message_id)
        if waiting:
            time.sleep(POLL_S)
    replies.update({m: f"no reply within {timeout:g} s" for m in waiting})
    return replies


PROGRESS_S = 10.0  # how often the start says what it is waiting for
QUERIES_IN_FLIGHT = 64  # queries out at once: each must be answered within its TTL, whatever the node count


def ask(grid: Grid, nodes: list[int], timeout: float) -> dict[int, dict]:
    """node id -> its answer to the query (which client it holds, how many samples it trains on). At most
    QUERIES_IN_FLIGHT queries are out at once, the next sent as answers come in, each expiring after `timeout`
    (its TTL): hundreds of nodes served by a few simulation actors are all asked, and a node that does not answer
    in time is left out (the caller asks it again)."""
    answers, pending, out = {}, list(nodes), {}  # out: message id -> the time it expires
    next_report = time.monotonic() + PROGRESS_S
    while pending or out:
        if time.monotonic() > next_report:
            logger.info("Asking %d nodes which client they hold: %d answered", len(nodes), len(answers))
            next_report = time.monotonic() + PROGRESS_S
        batch, pending = pending[:QUERIES_IN_FLIGHT - len(out)], pending[QUERIES_IN_FLIGHT - len(out):]
        if batch:
            ids = grid.push_messages([Message(RecordDict(), node, "query", ttl=timeout) for node in batch])
            out.update({message_id: time.monotonic() + timeout for message_id in ids})
        replies = list(grid.pull_messages(list(out)))
        for reply in replies:
            out.pop(reply.metadata.reply_to_message_id, None)
            if reply.has_error():
                raise SystemExit(f"Node {reply.metadata.src_node_id} cannot join the run: "
                                 f"{(reply.error.reason or '').strip()[-500:]}")
            answers[reply.metadata.src_node_id] = dict(reply.content["node"])
        out = {m: expires for m, expires in out.items() if expires > time.monotonic()}
        if not replies:
            time.sleep(POLL_S)
    return answers


def discover(grid: Grid, settings: RunSettings) -> dict[int, tuple[int, int]]:
    """Ask the connected nodes which client they hold until every client of the run has one: client index ->
    (node id, its sample count). The run's clients are num-clients if given, else the nodes' num-partitions.
    wait-for-nodes is the longest wait without progress: it starts again whenever a new node answers, so a start
    of many nodes that keep arriving is never cut short, and a start where none arrives stops with what is
    missing. Every PROGRESS_S the log says what it is waiting for."""
    patience = settings.flower.wait_for_nodes
    answers: dict[int, dict] = {}  # node id -> its answer
    start = last_progress = next_report = time.monotonic()
    while True:
        connected = grid.get_node_ids()
        new = [node for node in connected if node not in answers]
        if new:
            answers.update(ask(grid, new, patience))
            last_progress = time.monotonic()
        clients = clients_of(answers, settings.fed_args.num_clients)
        if clients is not None:
            logger.info("All %d clients have a node (%d nodes answered in %.1f s)", len(clients), len(answers),
                        time.monotonic() - start)
            return clients
        if time.monotonic() > last_progress + patience:
            missing = waiting_for(answers, connected, settings)
            raise SystemExit(f"No new node for wait-for-nodes {patience:g} s: {missing}. Start the missing "
                             f"SuperNodes (node-config partition-id), lower num-clients, or raise wait-for-nodes.")
        if time.monotonic() > next_report:
            logger.info("Waiting for nodes: %s", waiting_for(answers, connected, settings))
            next_report = time.monotonic() + PROGRESS_S
        time.sleep(1.0)


def waiting_for(answers: dict, connected, settings: RunSettings) -> str:
    """What the start still lacks, in words: how many nodes are connected and which partitions have no node."""
    if not connected:
        return ("no SuperNode is connected to the SuperLink: check that they run and reach its address (a node's log "
                "with 401 Unauthorized: its public key is not registered, see docs/FLOWER.md)")
    expected = expected_clients(answers, settings)
    held = {a["partition_id"] for a in answers.values()}
    missing = [k for k in range(expected) if k not in held]
    shown = ", ".join(map(str, missing[:20])) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return (f"{len(connected)} nodes connected, {len(answers)} answered; "
            + (f"partitions {shown} of 0 .. {expected - 1} have no node yet" if expected else
               "no node declares num-partitions and run-config num-clients is not set"))


def rejoin(grid: Grid, node_of: dict, counts: list[int], timeout: float, asked: set) -> None:
    """A client whose node is gone gets the node that now holds its partition, if one has connected (a SuperNode
    restarted, or started on another machine with the client's data); its sample count must be unchanged."""
    connected = set(grid.get_node_ids())
    orphans = {k for k, node in node_of.items() if node not in connected}
    new = sorted(connected - set(node_of.values()) - asked)
    if not (orphans and new):
        return
    asked.update(new)  # a node that holds no orphan is asked once
    for node, answer in ask(grid, new, timeout).items():
        k = answer["partition_id"]
        if k in orphans and answer["num_samples"] == counts[k]:
            logger.info("Client %d rejoined on node %d", k, node)
            node_of[k] = node
        elif k in orphans:
            logger.warning("Node %d holds client %d with %d samples, not the run's %d: not used", node, k,
                           answer["num_samples"], counts[k])


def expected_clients(answers: dict, settings: RunSettings) -> int:
    declared = {a["num_partitions"] for a in answers.values() if "num_partitions" in a}
    return settings.fed_args.num_clients or max(declared, default=0)


def clients_of(answers: dict, num_clients: int | None) -> dict[int, tuple[int, int]] | None:
    """client -> (node, samples) when clients 0 .. N-1 all have a node, N = num_clients or the partitions that
    hold data (every node declaring num-partitions: all of them up to it); None while some are missing."""
    holding = {}
    for node, answer in answers.items():
        if answer["num_samples"] > 0:
            partition = answer["partition_id"]
            if partition in holding:
                raise SystemExit(f"Nodes {holding[partition][0]} and {node} both hold partition {partition}: give "
                                 f"each SuperNode its own node-config partition-id.")
            holding[partition] = (node, answer["num_samples"])
    if num_clients is None:
        declared = {a["num_partitions"] for a in answers.values() if "num_partitions" in a}
        if not declared:
            raise SystemExit("The nodes declare no num-partitions and run-config num-clients is not set: set one.")
        answered = {a["partition_id"] for a in answers.values()}
        if not all(p in answered for p in range(max(declared))):
            return None
        # A simulated federation may have more nodes than the dataset has clients: those hold no data.
        num_clients = len(holding)
    if all(k in holding for k in range(num_clients)):
        return {k: holding[k] for k in range(num_clients)}
    return None
