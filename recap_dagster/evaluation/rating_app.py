"""The rating page: a small Starlette app over the rating task in a storage root.

``recap-dagster rate`` serves it (uvicorn, loopback by default). A rater opens
``/?rater=NAME``; the page asks the task's questions in that rater's own order, blind
(images are served by question id, never by variant), takes keys (y / n, 1 / 2 / t) and
clicks, and posts each answer at once. The server records it with one atomic rewrite of
the rater's answer file (``human.add_answer``) and refuses, with a JSON error and without
touching what is saved, a malformed body, an unknown question, an answer the question
does not take, a second answer to a question, or an answer to a task that was rebuilt.
No Dagster import: the answers are the ``human_ratings`` asset's input.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from recap_dagster.evaluation import human
from recap_dagster.storage.root import Storage

PAGE = Path(__file__).with_name("rating_page.html")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(storage_root: str) -> Starlette:
    """The rating app over the task and answers under ``storage_root`` (local or s3://)."""
    store = Storage(storage_root)
    page = PAGE.read_text(encoding="utf-8")
    # Answers are read-modify-write per rater: one writer per rater at a time (this app is
    # one process; a second server on the same root must not serve the same rater).
    locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def task_or_error() -> dict | JSONResponse:
        task = await run_in_threadpool(human.read_task, store)
        if task is None:
            return _error(404, "no rating task yet: materialize the human_eval_task asset")
        return task

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "storage_root": store.root})

    async def session(request: Request) -> Response:
        rater = request.query_params.get("rater", "")
        try:
            human.check_rater(rater)
        except human.AnswerError as err:
            return _error(err.status, str(err))
        task = await task_or_error()
        if isinstance(task, JSONResponse):
            return task
        answers = await run_in_threadpool(human.read_rater_answers, store, task, rater)
        return JSONResponse(
            {
                "rater": rater,
                "task_version": task["version"],
                "questions": [human.blind_view(task, q) for q in human.rater_order(task, rater)],
                "answered": [a["question"] for a in answers],
            }
        )

    async def image(request: Request) -> Response:
        task = await task_or_error()
        if isinstance(task, JSONResponse):
            return task
        question_id, slot = request.path_params["question"], request.path_params["slot"]
        question = next((q for q in task["questions"] if q["id"] == question_id), None)
        if question is None:
            return _error(404, f"no question {question_id!r}")
        images = human.question_images(task, question)
        if slot >= len(images):
            return _error(404, f"question {question_id} shows {len(images)} image(s)")
        data = await run_in_threadpool(store.read_bytes, *images[slot])
        # Private: an image URL must not be cached across task versions by a proxy.
        return Response(data, media_type="image/png", headers={"Cache-Control": "private"})

    async def answer(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON: {rater, task_version, question, answer}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        missing = [k for k in ("rater", "task_version", "question", "answer") if k not in body]
        if missing:
            return _error(422, f"missing field(s): {', '.join(missing)}")
        if not all(isinstance(body[k], str) for k in ("rater", "task_version", "question")):
            return _error(422, "rater, task_version and question must be strings")
        task = await task_or_error()
        if isinstance(task, JSONResponse):
            return task
        if body["task_version"] != task["version"]:
            return _error(
                409,
                f"the task changed (now {task['version']}, this page showed "
                f"{body['task_version']}): reload the page",
            )
        try:
            human.check_rater(body["rater"])
            async with locks[body["rater"]]:
                record = await run_in_threadpool(
                    human.add_answer, store, task, body["rater"], body["question"],
                    body["answer"] if isinstance(body["answer"], str) else repr(body["answer"]),
                )  # fmt: skip
        except human.AnswerError as err:
            return _error(err.status, str(err))
        return JSONResponse({"saved": record}, status_code=201)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/health", health),
            Route("/api/session", session),
            Route("/api/image/{question:str}/{slot:int}", image),
            Route("/api/answers", answer, methods=["POST"]),
        ]
    )


def serve(storage_root: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the rating page until interrupted."""
    import uvicorn

    uvicorn.run(create_app(storage_root), host=host, port=port, log_level="info")
