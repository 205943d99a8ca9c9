//! A mocked API server for one action of the operator (`tower_test::mock::pair` behind a
//! `kube::Client`): the test plays the server as a scenario that expects each call in order and
//! answers it. [`play`] fails on an unexpected call, on an expected call that never came, and on
//! an extra call after the scenario ended.

use std::future::Future;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

/// The server side of the mocked API.
pub type Handle = mock::Handle<Request<Body>, Response<Body>>;
/// Answers one call.
pub type Responder = mock::SendResponse<Response<Body>>;

/// Bound of the operator's whole action.
const OPERATOR_DEADLINE: Duration = Duration::from_secs(10);
/// Bound of the rest of the scenario once the operator is done.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(5);
/// How long to listen for an extra call once the client is gone.
const EXTRA_CALL_WINDOW: Duration = Duration::from_secs(1);

/// One recorded request.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// The `Accept` header, empty when absent (e.g. a metadata-only GET asks for
    /// `PartialObjectMetadata`).
    pub accept: String,
    /// The JSON body, `Null` when empty.
    pub body: Value,
}

/// Runs `operator` with a client whose API server is `scenario`, and returns what the operator
/// returned once the scenario has ended and no call is left over.
pub async fn play<S, SF, O, OF, T>(namespace: &str, scenario: S, operator: O) -> T
where
    S: FnOnce(Handle) -> SF,
    SF: Future<Output = Handle> + Send + 'static,
    O: FnOnce(Client) -> OF,
    OF: Future<Output = T>,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let verifier = tokio::spawn(scenario(handle));
    // The client lives inside the operator's future and is dropped with it.
    let output = tokio::time::timeout(OPERATOR_DEADLINE, operator(Client::new(service, namespace)))
        .await
        .expect("the operator timed out: a call was not answered");
    let mut handle = tokio::time::timeout(SCENARIO_DEADLINE, verifier)
        .await
        .expect("scenario timed out: an expected call never came")
        .unwrap();
    // With the client dropped, any further request would have been sent before this point.
    let extra = tokio::time::timeout(EXTRA_CALL_WINDOW, handle.next_request()).await;
    if let Ok(Some((request, _))) = extra {
        panic!(
            "unexpected extra call {} {}",
            request.method(),
            request.uri()
        );
    }
    output
}

/// The next call, whatever it is, with its responder.
pub async fn next_call(handle: &mut Handle) -> (Call, Responder) {
    let (request, send) = handle
        .next_request()
        .await
        .expect("the operator made no further call");
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let accept = request
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (
        Call {
            method,
            path,
            query,
            accept,
            body,
        },
        send,
    )
}

/// Expects a call with this method and path and returns it with its responder.
pub async fn expect(handle: &mut Handle, method: Method, path: &str) -> (Call, Responder) {
    let (call, send) = next_call(handle).await;
    assert_eq!(
        (call.method.clone(), call.path.as_str()),
        (method, path),
        "unexpected call {} {}?{}",
        call.method,
        call.path,
        call.query
    );
    (call, send)
}

/// Answers with a JSON body.
pub fn respond(send: Responder, status: StatusCode, body: &Value) {
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    send.send_response(response);
}

/// The `Status` body the API server sends with an error.
pub fn failure(status: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "code": status.as_u16(), "message": message})
}

/// Answers `404 NotFound`.
pub fn not_found(send: Responder) {
    respond(
        send,
        StatusCode::NOT_FOUND,
        &failure(StatusCode::NOT_FOUND, "NotFound", "not found"),
    );
}

/// The status a status write sets: the operator writes a JSON patch `[test resourceVersion,
/// add /status]`, so the status is written only over the version it was computed from.
/// Panics when the body has another shape.
pub fn written_status(body: &Value) -> &Value {
    assert_eq!(body[0]["op"], "test", "status patch: {body}");
    assert_eq!(
        body[0]["path"], "/metadata/resourceVersion",
        "status patch: {body}"
    );
    assert_eq!(body[1]["op"], "add", "status patch: {body}");
    assert_eq!(body[1]["path"], "/status", "status patch: {body}");
    &body[1]["value"]
}
