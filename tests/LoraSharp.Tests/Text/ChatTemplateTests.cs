using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

/// <summary>Rendered prompts written out by hand from each format's documented template.</summary>
public class ChatTemplateTests
{
    static readonly ChatMessage[] Conversation =
    [
        ChatMessage.System("You are terse."),
        ChatMessage.User("Hi!"),
        ChatMessage.Assistant("Hello."),
        ChatMessage.User("2+2?"),
    ];

    [Fact]
    public void Llama2_puts_system_inside_the_first_inst_block()
    {
        var expected = "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] 2+2? [/INST]";
        Assert.Equal(expected, ChatTemplates.Render(ChatFormat.Llama2, Conversation));
        Assert.Equal("<s>[INST] Hi! [/INST]", ChatTemplates.Render(ChatFormat.Llama2, [ChatMessage.User(" Hi! ")]));
    }

    [Fact]
    public void Llama2_rejects_turns_out_of_order()
    {
        Assert.Throws<LoraSharpException>(() => ChatTemplates.Render(ChatFormat.Llama2, [ChatMessage.Assistant("x")]));
    }

    [Fact]
    public void Llama3_uses_header_tokens_and_eot()
    {
        var expected =
            "<|begin_of_text|>" +
            "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>" +
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>" +
            "<|start_header_id|>assistant<|end_header_id|>\n\n";
        Assert.Equal(expected, ChatTemplates.Render(ChatFormat.Llama3, Conversation));
        Assert.Equal(expected[..^"<|start_header_id|>assistant<|end_header_id|>\n\n".Length],
            ChatTemplates.Render(ChatFormat.Llama3, Conversation, addGenerationPrompt: false));
    }

    [Fact]
    public void ChatML_wraps_each_turn_in_im_start_and_im_end()
    {
        var expected =
            "<|im_start|>system\nYou are terse.<|im_end|>\n" +
            "<|im_start|>user\nHi!<|im_end|>\n" +
            "<|im_start|>assistant\nHello.<|im_end|>\n" +
            "<|im_start|>user\n2+2?<|im_end|>\n" +
            "<|im_start|>assistant\n";
        Assert.Equal(expected, ChatTemplates.Render(ChatFormat.ChatML, Conversation));
        Assert.Equal("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
            ChatTemplates.Render(ChatFormat.ChatML, [ChatMessage.User("Hi")], addGenerationPrompt: false,
                defaultSystemPrompt: ChatTemplates.QwenDefaultSystemPrompt));
    }

    public static TheoryData<string, ChatFormat> KnownTemplates() => new()
    {
        { "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}", ChatFormat.Llama2 },
        { "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}", ChatFormat.Llama3 },
        { "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}", ChatFormat.ChatML },
    };

    [Theory]
    [MemberData(nameof(KnownTemplates))]
    public void Format_is_detected_from_the_chat_template(string template, ChatFormat expected) =>
        Assert.Equal(expected, ChatTemplates.Detect(template));

    [Fact]
    public void Formats_are_picked_by_name()
    {
        Assert.Equal(ChatFormat.Llama3, ChatTemplates.Parse("Llama3"));
        Assert.Equal(ChatFormat.ChatML, ChatTemplates.Parse("qwen2"));
        Assert.Throws<LoraSharpException>(() => ChatTemplates.Parse("vicuna"));
    }

    [Fact]
    public void Llama2_chat_tokenizes_with_bos_and_eos_ids_from_the_sentencepiece_model()
    {
        var tok = new LlmTokenizer(SentencePieceTokenizer.Load(ReferenceData.PathOf("llm", "model", "tokenizer.model")),
            new TokenizerSettings { ChatTemplate = "[INST]", BosToken = "<s>", EosToken = "</s>" });
        Assert.Equal(ChatFormat.Llama2, tok.ChatFormat);
        var ids = tok.EncodeChat([ChatMessage.User("Hi"), ChatMessage.Assistant("Yo"), ChatMessage.User("Ok")]);
        Assert.Equal(2, ids.Count(i => i == 1));
        Assert.Equal(1, ids.Count(i => i == 2));
        Assert.Equal(1, ids[0]);
        Assert.Contains(2, tok.StopTokenIds);
    }
}
