//! Option haggling as a client: greeting, options and their replies, GO.

use super::*;

pub(super) async fn send_option<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    opt: &ClientOption,
) -> Result<(), ClientError> {
    let mut out = Vec::new();
    opt.encode(&mut out);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

pub(super) async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<OptionReply, ClientError> {
    let mut hb = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut hb).await?;
    let h = OptionReplyHeader::decode(&hb)?;
    if h.option != option {
        return Err(ClientError::Protocol(format!(
            "reply for option {} while {option} was asked",
            h.option
        )));
    }
    if h.length as u64 > MAX_REPLY_PAYLOAD {
        return Err(ClientError::Protocol("option reply too long".into()));
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data).await?;
    Ok(OptionReply::decode(h.reply_type, &data)?)
}

/// Sends an option that is answered by a single ACK or error: true when ACKed.
pub(super) async fn simple_option<R: AsyncRead + Unpin>(
    r: &mut R,
    w: &mut BoxWrite,
    opt: ClientOption,
) -> Result<bool, ClientError> {
    let code = opt.code();
    send_option(w, &opt).await?;
    match read_option_reply(r, code).await? {
        OptionReply::Ack => Ok(true),
        OptionReply::Error { .. } => Ok(false),
        other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// The server's greeting and our flags; returns whether NO_ZEROES is on.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<bool, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut gb = [0u8; codec::GREETING_LEN];
    r.read_exact(&mut gb).await?;
    let g = codec::Greeting::decode(&gb)?;
    if g.flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol(
            "server does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = g.flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    w.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

pub(super) async fn negotiate<R: AsyncRead + Unpin>(
    r: &mut R,
    w: &mut BoxWrite,
    opts: &ClientOptions,
    no_zeroes: bool,
) -> Result<ExportInfo, ClientError> {
    let name = opts.wire_name();
    let mut extended = false;
    let mut structured = false;
    if opts.extended && simple_option(r, w, ClientOption::ExtendedHeaders).await? {
        extended = true;
        structured = true;
    }
    if !structured && opts.structured && simple_option(r, w, ClientOption::StructuredReply).await? {
        structured = true;
    }
    let mut base_allocation = None;
    if structured && opts.base_allocation {
        let opt = ClientOption::SetMetaContext(MetaContextRequest {
            export: name.clone(),
            queries: vec![META_BASE_ALLOCATION.into()],
        });
        send_option(w, &opt).await?;
        loop {
            match read_option_reply(r, OPT_SET_META_CONTEXT).await? {
                OptionReply::MetaContext { id, name } if name == META_BASE_ALLOCATION => {
                    base_allocation = Some(id)
                }
                OptionReply::MetaContext { .. } => {}
                OptionReply::Ack | OptionReply::Error { .. } => break,
                other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
    }

    let go = ClientOption::Go(InfoRequest {
        name: name.clone(),
        requests: vec![INFO_BLOCK_SIZE],
    });
    send_option(w, &go).await?;
    let mut export = None;
    let mut block_size = None;
    loop {
        match read_option_reply(r, OPT_GO).await? {
            OptionReply::Info(InfoItem::Export { size, flags }) => export = Some((size, flags)),
            OptionReply::Info(InfoItem::BlockSize {
                min,
                preferred,
                max,
            }) => block_size = Some((min, preferred, max)),
            OptionReply::Info(_) => {}
            OptionReply::Ack => break,
            OptionReply::Error {
                code: REP_ERR_UNSUP,
                ..
            } => {
                // A server without GO: EXPORT_NAME cannot fail politely, but works.
                send_option(w, &ClientOption::ExportName(name.clone())).await?;
                let mut b = [0u8; codec::EXPORT_NAME_REPLY_LEN];
                r.read_exact(&mut b).await?;
                export = Some(codec::decode_export_name_reply(&b)?);
                if !no_zeroes {
                    let mut z = [0u8; codec::EXPORT_NAME_ZEROES];
                    r.read_exact(&mut z).await?;
                }
                break;
            }
            OptionReply::Error { code, message } => {
                return Err(ClientError::Refused {
                    option: OPT_GO,
                    code,
                    message,
                });
            }
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }
    let (size, flags) = export
        .ok_or_else(|| ClientError::Protocol("GO acknowledged without export info".into()))?;
    Ok(ExportInfo {
        size,
        flags,
        structured,
        extended,
        base_allocation,
        block_size,
    })
}
