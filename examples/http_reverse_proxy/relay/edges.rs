//! The QUIC side: accepting edges, registering them, and counting opens to them.

use super::*;

pub(super) async fn accept_edges(
    endpoint: quinn::Endpoint,
    state: Arc<RelayState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut edges = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let remote = incoming.remote_address();
                    let span = info_span!("edge", %remote, edge = tracing::field::Empty);
                    edges.spawn(handle_edge(incoming, Arc::clone(&state)).instrument(span));
                }
                None => break,
            },
            Some(_) = edges.join_next(), if !edges.is_empty() => {}
            () = until_stopped(&mut stop) => break,
        }
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    edges.abort_all();
}

async fn handle_edge(incoming: quinn::Incoming, state: Arc<RelayState>) {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            debug!(%error, "QUIC handshake failed");
            return;
        }
    };
    let session = Session::new(
        QuinnConnection::new(connection.clone()),
        Role::Server,
        state.session_config.clone(),
    );
    let handle = match session.start().await {
        Ok(handle) => handle,
        Err(error) => {
            warn!(%error, "session handshake failed");
            connection.close(CLOSE_UNREGISTERED.into(), b"session handshake failed");
            return;
        }
    };
    let (client, mut events) = SessionClient::with_events(handle);
    let registered =
        tokio::time::timeout(REGISTER_TIMEOUT, register(&state, &client, &mut events)).await;
    let Ok(Some(name)) = registered else {
        debug!("no valid registration; dropping the connection");
        connection.close(CLOSE_UNREGISTERED.into(), b"registration failed");
        return;
    };
    tracing::Span::current().record("edge", name.as_str());
    let id = state.attach(&name, client.clone());
    info!(edge = %name, "edge registered");
    // The relay serves nothing else to edges.
    while let Some(event) = events.recv().await {
        if let ClientEvent::OpenRequest { request_id, .. } = event {
            let reason = Some("the relay offers no services to edges".to_owned());
            let _ = client
                .reject_open(request_id, RejectCode::UnsupportedService, reason)
                .await;
        }
    }
    let reason = client.closed().await;
    state.detach(&name, id);
    info!(edge = %name, %reason, "edge disconnected");
}

/// Waits for a valid registration; answers invalid ones with `Unauthorized`.
async fn register(
    state: &RelayState,
    client: &SessionClient<QuinnConnection>,
    events: &mut tokio::sync::mpsc::Receiver<ClientEvent>,
) -> Option<String> {
    while let Some(event) = events.recv().await {
        let ClientEvent::OpenRequest {
            request_id,
            service,
            metadata,
        } = event
        else {
            continue;
        };
        let credentials = (service.as_str() == REGISTER_SERVICE)
            .then(|| parse_registration(&metadata))
            .flatten();
        let accepted = credentials
            .as_ref()
            .filter(|(edge, token)| valid_edge_name(edge) && state.tokens.check(edge, token));
        let Some((edge, _)) = accepted else {
            state
                .metrics
                .registrations
                .with_label_values(&["unauthorized"])
                .inc();
            let claimed = credentials.map(|(edge, _)| edge).unwrap_or_default();
            warn!(edge = %claimed, "registration refused");
            let reason = Some(format!("invalid credentials for edge {claimed:?}"));
            let _ = client
                .reject_open(request_id, RejectCode::Unauthorized, reason)
                .await;
            continue;
        };
        let stream_id = client.allocate_stream_id();
        client.accept_open(request_id, stream_id).await.ok()?;
        let (mut send, _recv) = client.connection().inner().open_bi().await.ok()?;
        client.bind_stream(&mut send, stream_id).await.ok()?;
        let _ = send.finish();
        let _ = client
            .close_stream(stream_id, CloseCode::Normal, None)
            .await;
        state.metrics.registrations.with_label_values(&["ok"]).inc();
        return Some(edge.clone());
    }
    None
}

/// A connector that counts opens by outcome.
#[derive(Clone)]
pub(super) struct MeteredConnector {
    pub(super) inner: Connector<QuinnConnection>,
    pub(super) opens: IntCounterVec,
}

type OpenFuture =
    Pin<Box<dyn Future<Output = Result<TunnelStream<QuinnConnection>, Error>> + Send>>;

impl Service<Uri> for MeteredConnector {
    type Response = TunnelStream<QuinnConnection>;
    type Error = Error;
    type Future = OpenFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Service::<Uri>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, uri: Uri) -> OpenFuture {
        let opening = self.inner.call(uri);
        let opens = self.opens.clone();
        Box::pin(async move {
            let result = opening.await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Error::StreamRejected { .. }) => "rejected",
                Err(Error::Timeout(_)) => "timeout",
                Err(Error::SessionClosed | Error::Disconnected) => "disconnected",
                Err(_) => "error",
            };
            opens.with_label_values(&[outcome]).inc();
            result
        })
    }
}
