using System.CommandLine;
using LoraSharp.Models.Llama;
using LoraSharp.Text;
using LoraSharp.Training.Llm;
using TorchSharp;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp generate-text --model DIR [--adapter DIR[:scale]]… [--load-in-4bit] --prompt "…"</c>: streams generated text.</summary>
public static class GenerateTextCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "HF Llama model folder.", Required = true };
        var adapters = new Option<string[]>("--adapter") { Description = "Adapter folder or file, optionally with :scale (repeatable).", AllowMultipleArgumentsPerToken = false };
        var prompt = new Option<string>("--prompt") { Description = "The prompt text.", Required = true };
        var chat = new Option<bool>("--chat") { Description = "Wrap the prompt as a user turn with the chat template." };
        var template = new Option<string?>("--chat-template") { Description = "llama2, llama3 or chatml (default: the model's)." };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Tokens to generate at most.", DefaultValueFactory = _ => 128 };
        var temperature = new Option<double>("--temperature") { Description = "Sampling temperature; 0 = greedy (default).", DefaultValueFactory = _ => 0.0 };
        var topK = new Option<int>("--top-k") { Description = "Keep the k most likely tokens when sampling (0 = off)." };
        var topP = new Option<double>("--top-p") { Description = "Nucleus sampling threshold (1 = off).", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<long?>("--seed") { Description = "Sampling seed (reproducible output)." };
        var bf16 = new Option<bool>("--bf16") { Description = "Run the model in bfloat16." };
        var fourBit = new Option<bool>("--load-in-4bit") { Description = "Store the decoder linears in NF4 (QLoRA's base: ~1/7 of the float32 memory; each forward dequantizes them)." };
        var command = new Command("generate-text", "Generate text with a Llama model and optional LoRA adapters (tokens are streamed).")
        {
            model, adapters, prompt, chat, template, maxNew, temperature, topK, topP, seed, bf16, fourBit,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var folder = parse.GetValue(model)!;
            var tokenizer = LlmTokenizer.Load(folder);
            var specs = (parse.GetValue(adapters) ?? []).Select(LlmAdapters.ParseSpec).ToList();
            bool nf4 = parse.GetValue(fourBit);
            if (!nf4 && specs.Select(s => s.Path).FirstOrDefault(LlmTrainer.WasTrainedOnNf4) is string trainedOnNf4)
                Console.Error.WriteLine($"note: {trainedOnNf4} was trained on the NF4 (QLoRA) base; --load-in-4bit runs on that base");
            using var loaded = LlmModelLoader.Load(folder, parse.GetValue(bf16) ? torch.ScalarType.BFloat16 : torch.ScalarType.Float32, quantize: nf4);
            var m = loaded.Model;
            using var host = LlmAdapters.Attach(m, specs, loaded.Quantized);
            IReadOnlyList<int> ids = parse.GetValue(chat)
                ? tokenizer.EncodeChat([ChatMessage.User(parse.GetValue(prompt)!)], addGenerationPrompt: true,
                    parse.GetValue(template) is { } t ? ChatTemplates.Parse(t) : null)
                : tokenizer.Encode(parse.GetValue(prompt)!, addEos: false);
            double temp = parse.GetValue(temperature);
            var options = new GenerationOptions
            {
                MaxNewTokens = parse.GetValue(maxNew), Sample = temp > 0, Temperature = temp > 0 ? temp : 1.0,
                TopK = parse.GetValue(topK), TopP = parse.GetValue(topP), Seed = parse.GetValue(seed), StopTokens = tokenizer.StopTokenIds,
            };
            var generated = new List<int>();
            string shown = "";
            foreach (var token in LlamaGenerator.Generate(m, ids, options))
            {
                generated.Add(token);
                var text = tokenizer.Decode(generated);
                // Print only complete new text (a multi-token character shows once its last byte arrives).
                if (text.StartsWith(shown, StringComparison.Ordinal) && !text.EndsWith('\uFFFD'))
                {
                    Console.Write(text[shown.Length..]);
                    Console.Out.Flush();
                    shown = text;
                }
            }
            var final = tokenizer.Decode(generated);
            if (final.StartsWith(shown, StringComparison.Ordinal)) Console.Write(final[shown.Length..]);
            Console.WriteLine();
            return 0;
        }));
        return command;
    }
}
