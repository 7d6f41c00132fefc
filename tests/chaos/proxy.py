#!/usr/bin/env python3
"""TCP proxy for the chaos run: forwards 127.0.0.1:LISTEN to TARGET (host:port).

While the file CONTROL exists the target is "unreachable": open connections are cut and new
ones are closed at once. Usage: proxy.py LISTEN_PORT TARGET_HOST:PORT CONTROL_FILE
"""
import asyncio
import os
import sys


async def main():
    listen_port = int(sys.argv[1])
    target_host, target_port = sys.argv[2].rsplit(":", 1)
    control = sys.argv[3]
    open_writers = set()

    def down():
        return os.path.exists(control)

    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def handle(client_reader, client_writer):
        if down():
            client_writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, up_writer)
        open_writers.add(pair)
        try:
            await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))
        finally:
            open_writers.discard(pair)

    async def watch():
        was_down = False
        while True:
            now_down = down()
            if now_down and not was_down:
                print("proxy: target unreachable", flush=True)
                for client, upstream in list(open_writers):
                    client.transport.abort()
                    upstream.transport.abort()
            elif was_down and not now_down:
                print("proxy: target reachable again", flush=True)
            was_down = now_down
            await asyncio.sleep(0.1)

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    asyncio.get_running_loop().create_task(watch())
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
