from herder import db
from tests.support import running_daemon, wait_finished


async def test_synthetic_job_runs_to_success(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url):
        job_id = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', '{\"tasks\": 100}') RETURNING id"
        )
        job = await wait_finished(conn, job_id)
    assert job["status"] == "SUCCESS"
