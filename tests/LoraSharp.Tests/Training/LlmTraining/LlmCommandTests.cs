using System.CommandLine;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;

namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>train-llm, generate-text and merge-adapter run in-process through the real root command.</summary>
[Collection(TorchGlobalStateCollection.Name)]
public class LlmCommandTests
{
    static int Run(params string[] args) =>
        LoraSharp.Cli.CommandLine.Build().Parse(args).Invoke(new InvocationConfiguration { Output = new StringWriter(), Error = new StringWriter() });

    [Fact]
    public void Train_then_generate_then_merge_a_sharded_model()
    {
        int threads = torch.get_num_threads();
        torch.set_num_threads(1);
        try
        {
            using var dir = new TempDir();
            LlmTestModels.WriteJsonl(dir.File("d.jsonl"), Enumerable.Range(0, 6).Select(k => new { text = $"item {k} is fine" }));
            File.WriteAllText(dir.File("c.yaml"), $"""
                base_model: {LlmTestModels.ReferenceModel}
                datasets:
                  - path: d.jsonl
                    type: completion
                sequence_len: 64
                adapter: lora
                lora_target_modules: [q_proj, v_proj]
                max_steps: 3
                save_steps: 2
                output_dir: out
                """);
            Assert.Equal(0, Run("train-llm", dir.File("c.yaml")));
            Assert.True(File.Exists(dir.File("out/adapter_model.safetensors")));
            Assert.True(File.Exists(dir.File("out/loss.png")));
            Assert.True(Directory.Exists(dir.File("out/checkpoint-2")));
            Assert.Equal(0, Run("train-llm", dir.File("c.yaml"), "--resume")); // resumes at step 2, finishes step 3

            Assert.Equal(0, Run("generate-text", "--model", LlmTestModels.ReferenceModel, "--adapter", dir.File("out") + ":0.5",
                "--prompt", "item 3", "--max-new-tokens", "4", "--temperature", "0.7", "--top-k", "10", "--seed", "1"));

            // A two-shard copy of the reference model: the merged output keeps the shards and index.
            var sharded = dir.File("sharded");
            Directory.CreateDirectory(sharded);
            File.Copy(Path.Combine(LlmTestModels.ReferenceModel, "config.json"), Path.Combine(sharded, "config.json"));
            File.Copy(Path.Combine(LlmTestModels.ReferenceModel, "tokenizer.model"), Path.Combine(sharded, "tokenizer.model"));
            using (var model = LoraSharp.Models.Llama.LlamaCheckpoint.Load(LlmTestModels.ReferenceModel))
            {
                var all = model.named_parameters().ToList();
                var map = new System.Text.Json.Nodes.JsonObject();
                for (int s = 0; s < 2; s++)
                {
                    var name = $"model-0000{s + 1}-of-00002.safetensors";
                    var part = all.Where((_, i) => i % 2 == s).ToList();
                    LoraSharp.IO.SafetensorsWriter.Write(Path.Combine(sharded, name), part.Select(p => new KeyValuePair<string, torch.Tensor>(p.name, p.parameter)));
                    foreach (var p in part) map[p.name] = name;
                }
                File.WriteAllText(Path.Combine(sharded, "model.safetensors.index.json"), new System.Text.Json.Nodes.JsonObject { ["weight_map"] = map }.ToJsonString());
            }
            Assert.Equal(0, Run("merge-adapter", "--model", sharded, "--adapter", dir.File("out"), "--out", dir.File("merged")));
            Assert.True(File.Exists(dir.File("merged/model-00001-of-00002.safetensors")));
            Assert.True(File.Exists(dir.File("merged/model-00002-of-00002.safetensors")));
            Assert.True(File.Exists(dir.File("merged/model.safetensors.index.json")));
            using var merged = LoraSharp.Models.Llama.LlamaCheckpoint.Load(dir.File("merged"));

            File.WriteAllText(dir.File("bad.yaml"), "base_model: x\nlora_rank: 4\n");
            Assert.Equal(2, Run("train-llm", dir.File("bad.yaml")));
        }
        finally { torch.set_num_threads(threads); }
    }
}
