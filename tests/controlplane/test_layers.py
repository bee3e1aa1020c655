from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from channels.exceptions import ChannelFull

from controlplane.layers import SQLiteChannelLayer

ROOT = Path(__file__).resolve().parents[2]


def receive(layer: SQLiteChannelLayer, channel: str, timeout: float = 5.0):
    return asyncio.wait_for(layer.receive(channel), timeout)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "channels.sqlite3")


async def test_a_message_sent_by_one_layer_is_received_by_another(path):
    web, worker = SQLiteChannelLayer(path), SQLiteChannelLayer(path)
    channel = await web.new_channel()
    await worker.send(channel, {"type": "load.progress", "bytes": b"\x00\x01", "done": 0.5})
    assert await receive(web, channel) == {
        "type": "load.progress",
        "bytes": b"\x00\x01",
        "done": 0.5,
    }


async def test_messages_come_in_order_and_once(path):
    layer = SQLiteChannelLayer(path)
    for n in range(3):
        await layer.send("queue", {"type": "t", "n": n})
    assert [(await receive(layer, "queue"))["n"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TimeoutError):
        await receive(layer, "queue", timeout=0.3)


async def test_group_send_reaches_members_only_until_they_leave(path):
    layer = SQLiteChannelLayer(path)
    member, leaver, outsider = [await layer.new_channel() for _ in range(3)]
    await layer.group_add("fleet", member)
    await layer.group_add("fleet", leaver)
    await layer.group_discard("fleet", leaver)

    await SQLiteChannelLayer(path).group_send("fleet", {"type": "agent.update"})

    assert await receive(layer, member) == {"type": "agent.update"}
    for channel in (leaver, outsider):
        with pytest.raises(TimeoutError):
            await receive(layer, channel, timeout=0.2)


async def test_a_full_channel_refuses_more(path):
    layer = SQLiteChannelLayer(path, capacity=2)
    await layer.send("c", {"type": "t"})
    await layer.send("c", {"type": "t"})
    with pytest.raises(ChannelFull):
        await layer.send("c", {"type": "t"})


async def test_expired_messages_are_dropped(path):
    layer = SQLiteChannelLayer(path, expiry=0)
    await layer.send("c", {"type": "t"})
    with pytest.raises(TimeoutError):
        await receive(layer, "c", timeout=0.2)


async def test_flush_empties_queues_and_groups(path):
    layer = SQLiteChannelLayer(path)
    await layer.send("c", {"type": "t"})
    await layer.group_add("g", "c")
    await layer.flush()
    await layer.group_send("g", {"type": "t"})
    with pytest.raises(TimeoutError):
        await receive(layer, "c", timeout=0.2)


async def test_invalid_names_are_refused(path):
    layer = SQLiteChannelLayer(path)
    with pytest.raises(TypeError):
        await layer.send("bad name", {"type": "t"})
    with pytest.raises(TypeError):
        await layer.group_add("bad group!", "c")


async def test_group_send_crosses_processes(path):
    layer = SQLiteChannelLayer(path)
    channel = await layer.new_channel()
    await layer.group_add("dashboard", channel)
    sender = textwrap.dedent(
        f"""
        import asyncio
        from controlplane.layers import SQLiteChannelLayer
        asyncio.run(SQLiteChannelLayer({path!r}).group_send("dashboard", {{"type": "from.worker"}}))
        """
    )
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", sender], cwd=ROOT, check=True, timeout=60
    )
    assert await receive(layer, channel) == {"type": "from.worker"}
