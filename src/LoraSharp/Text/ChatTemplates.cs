using System.Text;

namespace LoraSharp.Text;

/// <summary>One turn of a conversation: role "system", "user" or "assistant".</summary>
public sealed record ChatMessage(string Role, string Content)
{
    public static ChatMessage System(string content) => new("system", content);
    public static ChatMessage User(string content) => new("user", content);
    public static ChatMessage Assistant(string content) => new("assistant", content);
}

/// <summary>The chat formats LoraSharp renders (no Jinja: each is written out directly).</summary>
public enum ChatFormat
{
    /// <summary>Llama 2 chat: <c>&lt;s&gt;[INST] &lt;&lt;SYS&gt;&gt;\n…\n&lt;&lt;/SYS&gt;&gt;\n\nuser [/INST] answer &lt;/s&gt;</c>.</summary>
    Llama2,
    /// <summary>Llama 3 instruct: <c>&lt;|begin_of_text|&gt;&lt;|start_header_id|&gt;role&lt;|end_header_id|&gt;\n\n…&lt;|eot_id|&gt;</c>.</summary>
    Llama3,
    /// <summary>ChatML (Qwen2 and others): <c>&lt;|im_start|&gt;role\n…&lt;|im_end|&gt;\n</c>.</summary>
    ChatML,
}

/// <summary>Renders conversations in the known chat formats, as the models' HF chat templates do.</summary>
public static class ChatTemplates
{
    /// <summary>Qwen2's template inserts this system turn when the conversation has none.</summary>
    public const string QwenDefaultSystemPrompt = "You are a helpful assistant.";

    /// <summary>The format a tokenizer_config chat_template string implements, or null when it is none of the known ones.</summary>
    public static ChatFormat? Detect(string chatTemplate) =>
        chatTemplate.Contains("<|start_header_id|>", StringComparison.Ordinal) ? ChatFormat.Llama3
        : chatTemplate.Contains("<|im_start|>", StringComparison.Ordinal) ? ChatFormat.ChatML
        : chatTemplate.Contains("[INST]", StringComparison.Ordinal) ? ChatFormat.Llama2
        : null;

    /// <summary>Picks a format by name: "llama2", "llama3", "chatml" (case-insensitive; "qwen2" = chatml).</summary>
    public static ChatFormat Parse(string name) => name.ToLowerInvariant() switch
    {
        "llama2" or "llama-2" => ChatFormat.Llama2,
        "llama3" or "llama-3" => ChatFormat.Llama3,
        "chatml" or "qwen2" or "qwen" => ChatFormat.ChatML,
        _ => throw new LoraSharpException($"unknown chat format '{name}' (expected llama2, llama3 or chatml)"),
    };

    /// <summary>The token that ends an assistant turn in <paramref name="format"/> (a stop token for generation).</summary>
    public static string EndOfTurnToken(ChatFormat format) => format switch
    {
        ChatFormat.Llama2 => "</s>",
        ChatFormat.Llama3 => "<|eot_id|>",
        _ => "<|im_end|>",
    };

    /// <summary>
    /// The prompt text of <paramref name="messages"/>. <paramref name="addGenerationPrompt"/> appends the header of an
    /// assistant turn (Llama 3, ChatML; a Llama 2 prompt already ends with [/INST]).
    /// </summary>
    /// <param name="bosToken">Llama 2: "&lt;s&gt;"; Llama 3: "&lt;|begin_of_text|&gt;" is used when this is left at "&lt;s&gt;".</param>
    /// <param name="defaultSystemPrompt">ChatML: a system turn put first when the conversation has none (Qwen2 does this).</param>
    public static string Render(ChatFormat format, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt = true,
        string bosToken = "<s>", string eosToken = "</s>", string? defaultSystemPrompt = null)
    {
        foreach (var m in messages)
            if (m.Role is not ("system" or "user" or "assistant"))
                throw new LoraSharpException($"chat role '{m.Role}' is not supported (expected system, user or assistant)");
        return format switch
        {
            ChatFormat.Llama2 => RenderLlama2(messages, bosToken, eosToken),
            ChatFormat.Llama3 => RenderLlama3(messages, addGenerationPrompt, bosToken == "<s>" ? "<|begin_of_text|>" : bosToken),
            _ => RenderChatML(messages, addGenerationPrompt, defaultSystemPrompt),
        };
    }

    static string RenderLlama2(IReadOnlyList<ChatMessage> messages, string bos, string eos)
    {
        string? system = messages.Count > 0 && messages[0].Role == "system" ? messages[0].Content : null;
        var turns = system is null ? messages : messages.Skip(1).ToList();
        var sb = new StringBuilder();
        for (int i = 0; i < turns.Count; i++)
        {
            var m = turns[i];
            var expected = i % 2 == 0 ? "user" : "assistant";
            if (m.Role != expected)
                throw new LoraSharpException($"Llama 2 chat needs alternating user/assistant turns after an optional system turn; turn {i} is '{m.Role}'");
            var content = i == 0 && system is not null ? $"<<SYS>>\n{system}\n<</SYS>>\n\n{m.Content}" : m.Content;
            if (m.Role == "user")
                sb.Append(bos).Append("[INST] ").Append(content.Trim()).Append(" [/INST]");
            else
                sb.Append(' ').Append(content.Trim()).Append(' ').Append(eos);
        }
        return sb.ToString();
    }

    static string RenderLlama3(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt, string bos)
    {
        var sb = new StringBuilder(bos);
        foreach (var m in messages)
            sb.Append("<|start_header_id|>").Append(m.Role).Append("<|end_header_id|>\n\n").Append(m.Content.Trim()).Append("<|eot_id|>");
        if (addGenerationPrompt)
            sb.Append("<|start_header_id|>assistant<|end_header_id|>\n\n");
        return sb.ToString();
    }

    static string RenderChatML(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt, string? defaultSystem)
    {
        var sb = new StringBuilder();
        if (defaultSystem is not null && (messages.Count == 0 || messages[0].Role != "system"))
            sb.Append("<|im_start|>system\n").Append(defaultSystem).Append("<|im_end|>\n");
        foreach (var m in messages)
            sb.Append("<|im_start|>").Append(m.Role).Append('\n').Append(m.Content).Append("<|im_end|>\n");
        if (addGenerationPrompt)
            sb.Append("<|im_start|>assistant\n");
        return sb.ToString();
    }
}
